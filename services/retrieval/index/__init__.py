"""Search indexes of the retrieval service: dense (FAISS), sparse (BM25) and their fusion.

Indexes know rows (0..size-1) only; mapping rows to chunks is the caller's job.
"""
