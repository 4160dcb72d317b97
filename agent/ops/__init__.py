"""Operations: what a person running boards meets around the daemon.

- ``units``: the systemd units rendered for a board profile and a model, memory limits from the plan;
- ``install``: install and uninstall as a service (user, folders, config, credentials, units), as a
  list of idempotent steps that a dry run prints and tests run under a throw-away root;
- ``doctor``: checks of a board, each OK / WARN / FAIL with a one-line fix;
- ``state``: the small state file the daemon keeps current, and ``status``, its reader with the store;
- ``progress``: progress of long operations, a bar on a terminal and log lines under systemd;
- ``logs``: log formats (text, key=value, JSON), journald awareness and the secret filter.
"""
