"""healdust: "Heal dust (AI)" — find and heal dust, hairs and scratches for Krita and GIMP."""

__version__ = "0.1.0"
