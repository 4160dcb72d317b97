"""The application: the parts built bottom-up (wiring), the daemon's life cycle (daemon), what it says
about itself (reporter, state), the live settings apply path (applier) and `run --demo` (demo)."""
