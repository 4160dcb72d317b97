"""The system boundary: memory readings and budget (memory), process priority, service notification."""
