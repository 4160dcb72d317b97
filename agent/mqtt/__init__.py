"""MQTT: the only code that touches paho-mqtt (transport), every topic name (topics), the JSON wire
helpers shared by every payload parser (wire), and the outbox that publishes what the device owes
upstream until the broker acknowledges it."""
