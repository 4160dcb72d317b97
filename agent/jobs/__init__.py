"""The job path: intake (message to store to ack), the runner (claim and run), outcomes (pure)."""
