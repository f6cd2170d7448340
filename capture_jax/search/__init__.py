"""Using a trained run: index a catalogue, query it with a picture and a title, serve a page.

`python -m capture_jax.search index|query|serve` (README, "Query a trained model"):

* `run.py`: a run's model loaded for inference (config.json, vocab, a checkpoint step), its
  fingerprint, and one jitted embedding of fixed batch shape;
* `inputs.py`: a query's picture, title and boxes checked (`QueryError`: one sentence) and turned
  into model rows exactly as the input pipeline turns a built example into one;
* `catalogue.py`: the index on disk, made from a built split or an official-format directory,
  and its search (the evaluator's ranker, or an optional faiss approximate index);
* `searcher.py`: a model and an index that belong together; a batch of queries in, ranked items out;
* `server.py`: the JSON API and the page (FastAPI on uvicorn), concurrent requests batched;
* `__main__.py`: the command.

The index is a directory another program can read without this package:
  manifest.json     what made it: format, variant, step, workdir, config_hash (model config and
                    vocabulary), feature_kinds, dims, count, source, max_image_side, image_size;
  <kind>.npy        float32 [count, dims[kind]] per feature kind, rows in items.jsonl order;
  items.jsonl       one JSON object per row: {"id", "title", "thumbnail": [offset, length]};
  thumbnails.bin    the rows' JPEG thumbnails, concatenated (thumbnail = its byte range; [0, 0]
                    where the row's image could not be read);
  <kind>.<ivf|hnsw>.faiss  optional approximate index (`index --approximate`).
Single process: these tools run on one host (all of its devices).
"""
