"""fedcore's Flower ServerApp."""
