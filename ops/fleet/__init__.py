"""Fleets of devices on one machine: real worker processes (workers.py) and emulated devices (emulated.py)."""
