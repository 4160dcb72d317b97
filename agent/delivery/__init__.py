"""Delivery: publishing what the device owes upstream (job results, the telemetry spool) at least once."""
