"""Robot bridge over OpenIGTLink: message codec (codec), sockets (transport), the workphase session (protocol)
and a robot simulator speaking the same protocol for the demo and tests (simulator)."""
