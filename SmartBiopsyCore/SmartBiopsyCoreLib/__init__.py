"""SmartBiopsyCore library: what every SmartBiopsy module shares.
Geometry (RasVolume, the one LPS<->RAS conversion), the error base, progress/cancel, data I/O, the headless runtime, phantoms."""
