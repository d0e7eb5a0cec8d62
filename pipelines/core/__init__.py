"""The bottom layer: errors, storage locations, the console, typed settings -> flags. Imports nothing of the platform above it."""
