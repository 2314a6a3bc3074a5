"""Private helpers shared by the public modules."""
