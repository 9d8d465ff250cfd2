"""Statistics on latents: per-image detectors, drift tests, axis attribution."""
