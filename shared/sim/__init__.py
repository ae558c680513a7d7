"""Broker-free simulation of FedMask and its baselines, on the same code the pipeline runs."""
