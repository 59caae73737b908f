"""After the run: the group-ordered JSONL and failure report, post-processing, Excel fail reasons."""
