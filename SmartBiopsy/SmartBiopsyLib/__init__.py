"""SmartBiopsy library: everything below the Slicer module file."""
