"""The reference CAPTURE state-dict names and our parameter paths, one table for `convert`.

The authors' PyTorch model (`BertForMultiModalPreTraining`) names a tensor `module.leaf`.
`REFERENCE_MODULES` pairs each reference module with ours and a kind that fixes the leaves: a
Linear's `weight` [out, in] is our `kernel` [in, out] (transposed), a LayerNorm's `weight` our
`scale`, an Embedding's `weight` our `embedding`, a `bias` stays `bias`; the joint encoder's
`nn.MultiheadAttention` keeps q|k|v fused (`in_proj_weight`, `in_proj_bias`: 3 x hidden rows).
`{i}` is a layer index; `reference_name_table(config.model)` expands it for the model's sizes.
The text half is BERT's own naming, so bert-base-chinese files go through the same table.

Not in the table: the MLM decoder weight (`TIED_REFERENCE_TENSORS`), which is the word-embedding
table, and what the reference builds but never trains (`UNUSED_REFERENCE_TENSORS`: the
co-attention's `q_dense1/2` and the joint encoder's pooler).
"""

import re

import ml_collections

# (reference module, our module, kind); kind gives the leaf names (see `reference_name_table`).
_BERT_LAYER = (
    ("attention.self.query", "attention.query", "linear"),
    ("attention.self.key", "attention.key", "linear"),
    ("attention.self.value", "attention.value", "linear"),
    ("attention.output.dense", "attention.out", "linear"),
    ("attention.output.LayerNorm", "attention.norm", "norm"),
    ("intermediate.dense", "ffn.intermediate", "linear"),
    ("output.dense", "ffn.output", "linear"),
    ("output.LayerNorm", "ffn.norm", "norm"),
)
_QKV = ("query", "key", "value")
_VT = (("v", "visual"), ("t", "text"))
_CO_LAYER = (
    *((f"biattention.{n}1", f"visual_{n}", "linear") for n in _QKV),
    *((f"biattention.{n}2", f"text_{n}", "linear") for n in _QKV),
    ("biOutput.dense1", "visual_out", "linear"),
    ("biOutput.LayerNorm1", "visual_norm", "norm"),
    ("biOutput.dense2", "text_out", "linear"),
    ("biOutput.LayerNorm2", "text_norm", "norm"),
    *((f"{r}_intermediate.dense", f"{o}_ffn.intermediate", "linear") for r, o in _VT),
    *((f"{r}_output.dense", f"{o}_ffn.output", "linear") for r, o in _VT),
    *((f"{r}_output.LayerNorm", f"{o}_ffn.norm", "norm") for r, o in _VT),
)
_JOINT_BLOCK = (
    ("attn.in_proj", "attention.in_proj", "fused"),
    ("attn.out_proj", "attention.out_proj", "linear"),
    ("ln_1", "attention_norm", "norm"),
    ("ln_2", "mlp_norm", "norm"),
    ("mlp.c_fc", "mlp_in", "linear"),
    ("mlp.c_proj", "mlp_out", "linear"),
)
REFERENCE_MODULES = (
    ("bert.embeddings.word_embeddings", "text_embeddings.word_embeddings", "embed"),
    ("bert.embeddings.position_embeddings", "text_embeddings.position_embeddings", "embed"),
    ("bert.embeddings.token_type_embeddings", "text_embeddings.token_type_embeddings", "embed"),
    ("bert.embeddings.LayerNorm", "text_embeddings.layer_norm", "norm"),
    ("bert.v_embeddings.image_embeddings", "visual_embeddings.feature_embeddings", "linear"),
    ("bert.v_embeddings.image_location_embeddings", "visual_embeddings.location_embeddings",
     "linear"),
    ("bert.v_embeddings.LayerNorm", "visual_embeddings.layer_norm", "norm"),
    *((f"bert.encoder.layer.{{i}}.{r}", f"text_layers.{{i}}.{o}", k) for r, o, k in _BERT_LAYER),
    *((f"bert.encoder.v_layer.{{i}}.{r}", f"visual_layers.{{i}}.{o}", k)
      for r, o, k in _BERT_LAYER),
    *((f"bert.encoder.c_layer.{{i}}.{r}", f"co_layers.{{i}}.{o}", k) for r, o, k in _CO_LAYER),
    ("bert.encoder.t_pooler.dense", "text_pooler", "linear"),
    ("bert.encoder.v_pooler.dense", "visual_pooler", "linear"),
    ("bert.cross_encoder.embeddings.position_embeddings", "joint.position_embeddings", "embed"),
    *((f"bert.cross_encoder.transformer.resblocks.{{i}}.{r}", f"joint.blocks.{{i}}.{o}", k)
      for r, o, k in _JOINT_BLOCK),
    ("bert.t_fc.dense", "text_out", "linear"),
    ("bert.v_fc.dense", "visual_out", "linear"),
    ("cls.t_fc", "text_head_proj", "linear"),
    ("cls.v_fc", "visual_head_proj", "linear"),
    ("cls.predictions.transform.dense", "mlm_head.dense", "linear"),
    ("cls.predictions.transform.LayerNorm", "mlm_head.layer_norm", "norm"),
    ("cls.predictions", "mlm_head", "bias"),
    ("cls.imagePredictions.transform.dense", "mrm_head.dense", "linear"),
    ("cls.imagePredictions.transform.LayerNorm", "mrm_head.layer_norm", "norm"),
    ("cls.imagePredictions.decoder", "mrm_head.decoder", "linear"),
)
_LEAVES = {  # kind -> ((reference leaf suffix, our leaf suffix, transpose), ...)
    "linear": ((".weight", ".kernel", True), (".bias", ".bias", False)),
    "norm": ((".weight", ".scale", False), (".bias", ".bias", False)),
    "embed": ((".weight", ".embedding", False),),
    "bias": ((".bias", ".bias", False),),
    "fused": (("_weight", ".kernel", True), ("_bias", ".bias", False)),  # nn.MultiheadAttention
}
TIED_REFERENCE_TENSORS = ("cls.predictions.decoder.weight",)  # = word embeddings
UNUSED_REFERENCE_TENSORS = re.compile(  # built by the reference, never trained: left out
    r"bert\.encoder\.c_layer\.\d+\.biOutput\.q_dense[12]\.|bert\.cross_encoder\.pooler\.")


def reference_name_table(config: ml_collections.ConfigDict) -> dict[str, tuple[str, bool]]:
    """Reference tensor name -> (our parameter path, transpose?) for `config.model` sizes."""
    counts = {"text_layers": config.text.num_layers, "visual_layers": config.visual.num_layers,
              "co_layers": config.co.num_layers, "joint.blocks": config.joint.num_layers}
    table = {}
    for ref, ours, kind in REFERENCE_MODULES:
        stack = next((s for s in counts if ours.startswith(s + ".{i}")), None)
        for i in range(counts[stack]) if stack else [None]:
            for ref_leaf, our_leaf, transpose in _LEAVES[kind]:
                name = (ref + ref_leaf).replace("{i}", str(i))
                table[name] = ((ours + our_leaf).replace("{i}", str(i)), transpose)
    return table
