"""Client side: message handlers, training loops, models, data and partitions."""
