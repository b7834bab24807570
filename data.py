"""Data for LLaVA-SLT (paper sections 4.1 and C; DESIGN.md section 4).

Video reading (mp4 through PyAV, frame folders through Pillow), frame sampling, the clip
transforms, readers of the public dataset layouts into manifest rows, collate functions
with masks, the VLT prompt/label builder, CPT corpus packing, and a synthetic sign language
that the demo and the tests render to real mp4 files.
"""

# ============================================================================ core
# (owned by the data-core work: video io, transforms, readers, datasets, collate, prompts, corpus)


# ============================================================================ synthetic
# (owned by the synthetic-language work: the invented sign language, its renderer and `python data.py synth`)
