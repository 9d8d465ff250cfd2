"""Images to latents: encoding, measurable image properties, latent quality."""
