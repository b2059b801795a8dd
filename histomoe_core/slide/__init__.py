"""Slides without transcriptomics: readers (:mod:`.reader`), tissue grid (:mod:`.tissue`), tile patches for the
embedding cache (:mod:`.patches`), prediction (:mod:`.predict`), outputs (:mod:`.outputs`) and checks against
measured expression (:mod:`.validation`)."""
