"""Data formats, one module each: corpus files (`corpus`), JSONL (`jsonl`), BEIR folders (`beir`), training
pairs (`pairs`), the title-join and normalisation rules (`text`), QA files to BEIR (`qa_to_beir`)."""
