"""`spin-ray eval`: answer quality of sparse attention against dense, measured on seeded
synthetic long-context tasks (RULER-style) and on the teacher-forced log-likelihood of long
natural text."""
