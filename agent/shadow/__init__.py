"""The device shadow: desired and reported state of a board over MQTT (docs/protocol.md, docs/shadow.md).

document   the document and the rules of an update, pure (AWS IoT Device Shadow semantics)
desired    which keys operators may set (the live settings) and how a desired state is checked
reconcile  settings wanted + settings in force -> ordered actions, pure; the Executor interface
store      persistence in {device.state_dir}/shadow.db
facts      board facts for reported
messages   the payload models of every shadow topic
service    ShadowService: the MQTT edge the daemon wires in
client     ShadowClient: the operator's side (edge-agent shadow get|set)
"""
