"""What the Flower apps call: build the objects a run needs from its config and run it."""
