"""Observers and calibrators that initialise quantizer step sizes from data."""
