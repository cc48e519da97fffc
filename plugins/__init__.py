"""Editor plugin sources (Krita, GIMP 3), shipped as package data for the installers."""
