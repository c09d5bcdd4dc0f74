"""What spin-ray fits to a checkpoint rather than computes at run time: Seer's gate."""
