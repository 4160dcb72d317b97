"""Home Assistant MQTT discovery: the board as a device in Home Assistant.

``discovery_messages`` / ``removal_messages`` (pure) say what to publish; ``DiscoveryPublisher`` is
what the daemon calls on every connect. Off by default (``[homeassistant] enabled``).
"""

from agent.ha.discovery import discovery_messages, list_models, removal_messages
from agent.ha.publisher import DiscoveryPublisher

__all__ = ["DiscoveryPublisher", "discovery_messages", "list_models", "removal_messages"]
