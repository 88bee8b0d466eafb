"""`hpcllm dedup`'s parts: text normalisation, the band records' exchange and spill, and the clusters."""
