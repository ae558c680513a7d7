"""How FedMask is run: the `fedmask` CLI (cli/) over the rooms it calls (control/, services/, demo/,
fleet/, bench/, engine/), and the deployment files (deploy/)."""
