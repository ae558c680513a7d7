"""How FedMask is run: the operator CLI and (later) deployment files."""
