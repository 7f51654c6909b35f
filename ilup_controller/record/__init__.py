"""Durable procedure record (SQLite WAL, synchronous=FULL), its report and CSV export."""

from ilup_controller.record.recorder import Recorder, RecorderError
from ilup_controller.record.store import RecordData, RecordError, open_record

__all__ = ["RecordData", "RecordError", "Recorder", "RecorderError", "open_record"]
