"""The nightly retrain (selection, training, gate, registration) and the (lambda, zeta, d) sweep."""
