"""Token sinks: where a new token is written."""
