"""``ilup guard``: the independent safety layer (docs/security.md, issue 12).

decide.py is the pure decision (no I/O, explicit time); runner.py is the process around it,
with its own Modbus connections and MQTT client. Nothing here imports the control core, the
alarm engine or the procedure: only the config models and the register codec are shared.
"""
