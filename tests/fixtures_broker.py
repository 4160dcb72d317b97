"""Fixtures that run private Mosquitto brokers (owner: transport)."""
