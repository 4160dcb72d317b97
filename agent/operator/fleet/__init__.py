"""The operator's side of a fleet: listing devices and staged model rollouts (edge-agent fleet).

plan     the rollout's decisions, pure: waves, one device's outcome, advance / finish / abort
store    the rollout record, a local SQLite file (resume after Ctrl-C or a crash)
client   FleetClient: every device's retained status and shadow document, shadow updates
rollout  RolloutDriver: carries out the decisions through the devices' shadows
"""
