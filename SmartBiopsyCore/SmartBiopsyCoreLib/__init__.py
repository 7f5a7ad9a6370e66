"""SmartBiopsyCore library: what every SmartBiopsy module shares.
Geometry (RasVolume, the one LPS<->RAS conversion), the error base, progress/cancel, data I/O, the headless runtime, phantoms."""

#: SmartBiopsy's version: the one place it is written (pyproject.toml reads it; `smartbiopsy --version`,
#: summary.json and the report show it)
__version__ = "0.1.0"
