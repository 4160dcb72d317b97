"""The operator's side: clients that talk to boards over MQTT (jobs, shadow) and the fleet tools."""
