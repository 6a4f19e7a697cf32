"""Model I/O: reading, checking and writing models (modelio), tensor data kept apart (external_data),
protobuf helpers (proto), unreadable files (wire), third-party messages as one line (messages) and the
scratch folder a model's session owns (scratch)."""
