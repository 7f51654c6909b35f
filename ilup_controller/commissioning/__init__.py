"""`ilup commission`: the pre-use checklist of a cart, its results file and the gate on priming.

- ``steps.py``: the steps as data (id, title, what it checks, what to fix);
- ``evaluate.py``: pure evaluation of measured samples (no I/O);
- ``runner.py``: the Modbus edge: drives the plant through the daemon's device links;
- ``results.py``: the commissioning file next to the cart file; ``gate.py``: may priming start.
"""
