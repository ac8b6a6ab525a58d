"""fedcore's Flower ClientApp."""
