"""The CAPTURE reference model in PyTorch, the yardstick of bench/step_vs_torch.py.

A compact re-implementation of the authors' `BertForMultiModalPreTraining` as docs/reference.md
describes it, written for this benchmark (not their code). Its module names give exactly the
reference's state-dict names (tests/reference_state_dict.tsv) less the tensors that never get a
gradient (`reference_names.UNUSED_REFERENCE_TENSORS`: `q_dense1/2`, the joint pooler), so a
reference checkpoint, or ours through `convert.params_to_reference`, loads with `strict=True`.
The MLM decoder (`cls.predictions.decoder.weight`) is the word-embedding Parameter itself.

With the two fixes of docs/reference.md that touch a step: the joint encoder's key-padding mask
is per sample (bug 1) and weight decay goes to matrices and embeddings only (bug 2). Dropout rates
are arguments (`paper`: 0.1 hidden, 0.1 on attention probabilities, none inside the joint
attention); `model.train()` turns them on. Attention uses `F.scaled_dot_product_attention`
(PyTorch's fastest CPU path), the joint encoder `nn.MultiheadAttention` as the reference does.

    model = CaptureReference(ReferenceConfig.from_model_config(config.model))
    opt = make_optimizer(model)
    metrics = train_step(model, opt, batch)   # batch: the canonical keys, as torch tensors
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

STREAM_MASK_VALUE = -10000.0  # additive mask in the streams and the co-attention
JOINT_MASK_VALUE = -1e6  # additive mask in the joint encoder
GLOBAL_BOX = (0.0, 0.0, 1.0, 1.0, 1.0)  # the global token's location: the whole image


@dataclasses.dataclass(frozen=True)
class ReferenceConfig:
    """Sizes (defaults: `paper`) and dropout rates."""

    vocab_size: int = 21128
    hidden: int = 768
    max_text_positions: int = 512
    type_vocab_size: int = 2
    out_dim: int = 512
    eps: float = 1e-12
    text_layers: int = 4
    text_heads: int = 12
    text_mlp: int = 3072
    visual_layers: int = 4
    visual_heads: int = 8
    visual_mlp: int = 1024
    feature_dim: int = 2048
    co_layers: int = 4
    co_heads: int = 8
    co_width: int = 512
    joint_layers: int = 6
    joint_heads: int = 8
    joint_mlp: int = 3072
    joint_positions: int = 512
    dropout: float = 0.1
    attention_dropout: float = 0.1

    @classmethod
    def from_model_config(cls, c, **overrides) -> ReferenceConfig:
        """Sizes and dropout rates of our `config.model` (regions), then `overrides`."""
        t, v, co, j = c.text, c.visual, c.co, c.joint
        fields = dict(
            vocab_size=c.vocab_size, hidden=c.hidden_size, max_text_positions=c.max_text_positions,
            type_vocab_size=c.type_vocab_size, out_dim=c.out_dim, eps=c.layer_norm_eps,
            text_layers=t.num_layers, text_heads=t.num_heads, text_mlp=t.mlp_dim,
            visual_layers=v.num_layers, visual_heads=v.num_heads, visual_mlp=v.mlp_dim,
            feature_dim=v.feature_dim, co_layers=co.num_layers, co_heads=co.num_heads,
            co_width=co.width, joint_layers=j.num_layers, joint_heads=j.num_heads,
            joint_mlp=j.mlp_dim, joint_positions=j.max_positions, dropout=c.dropout_rate,
            attention_dropout=c.attention_dropout_rate)
        return cls(**{**fields, **overrides})


def attend(q, k, v, bias, heads: int, p: float, training: bool):
    """softmax(q k^T / sqrt(d) + bias) v over `heads` heads, dropout `p` on the probabilities;
    q [B, T, H*D], k/v [B, S, H*D], bias [B, 1, 1, S] -> [B, T, H*D]."""
    split = lambda x: x.unflatten(-1, (heads, -1)).transpose(1, 2)  # noqa: E731
    ctx = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=bias,
                                         dropout_p=p if training else 0.0)
    return ctx.transpose(1, 2).flatten(2)


def key_bias(mask, value: float):
    """[B, S] key mask (1 = attend) -> additive [B, 1, 1, S]."""
    return ((1.0 - mask.float()) * value)[:, None, None, :]


# --------------------------------------------------------------------------- embeddings
class TextEmbeddings(nn.Module):
    def __init__(self, c: ReferenceConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden)
        self.position_embeddings = nn.Embedding(c.max_text_positions, c.hidden)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden)
        self.LayerNorm = nn.LayerNorm(c.hidden, eps=c.eps)
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, ids):
        positions = torch.arange(ids.shape[1], device=ids.device)[None]
        x = (self.word_embeddings(ids) + self.position_embeddings(positions)
             + self.token_type_embeddings(torch.zeros_like(ids)))
        return self.dropout(self.LayerNorm(x))


class VisualEmbeddings(nn.Module):
    def __init__(self, c: ReferenceConfig):
        super().__init__()
        self.image_embeddings = nn.Linear(c.feature_dim, c.hidden)
        self.image_location_embeddings = nn.Linear(5, c.hidden)
        self.LayerNorm = nn.LayerNorm(c.hidden, eps=c.eps)
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, feats, boxes):
        x = self.image_embeddings(feats) + self.image_location_embeddings(boxes)
        return self.dropout(self.LayerNorm(x))


# --------------------------------------------------------------------------- BERT layers
class DenseNorm(nn.Module):
    """LN(residual + dropout(dense(x))): BERT's `attention.output` and `output`."""

    def __init__(self, d_in: int, c: ReferenceConfig):
        super().__init__()
        self.dense = nn.Linear(d_in, c.hidden)
        self.LayerNorm = nn.LayerNorm(c.hidden, eps=c.eps)
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, x, residual):
        return self.LayerNorm(residual + self.dropout(self.dense(x)))


class Intermediate(nn.Module):
    def __init__(self, d_out: int, c: ReferenceConfig):
        super().__init__()
        self.dense = nn.Linear(c.hidden, d_out)

    def forward(self, x):
        return F.gelu(self.dense(x))


class SelfAttention(nn.Module):
    def __init__(self, heads: int, c: ReferenceConfig):
        super().__init__()
        self.query, self.key, self.value = (nn.Linear(c.hidden, c.hidden) for _ in range(3))
        self.heads, self.p = heads, c.attention_dropout

    def forward(self, x, bias):
        return attend(self.query(x), self.key(x), self.value(x), bias, self.heads, self.p,
                      self.training)


class Attention(nn.Module):
    def __init__(self, heads: int, c: ReferenceConfig):
        super().__init__()
        self.self = SelfAttention(heads, c)
        self.output = DenseNorm(c.hidden, c)

    def forward(self, x, bias):
        return self.output(self.self(x, bias), x)


class BertLayer(nn.Module):
    """Post-LN transformer layer of the text and visual streams."""

    def __init__(self, heads: int, mlp: int, c: ReferenceConfig):
        super().__init__()
        self.attention = Attention(heads, c)
        self.intermediate = Intermediate(mlp, c)
        self.output = DenseNorm(mlp, c)

    def forward(self, x, bias):
        x = self.attention(x, bias)
        return self.output(self.intermediate(x), x)


# --------------------------------------------------------------------------- co-attention
class BiAttention(nn.Module):
    """`*1` projections read the visual stream, `*2` the text stream."""

    def __init__(self, c: ReferenceConfig):
        super().__init__()
        for name in ("query1", "key1", "value1", "query2", "key2", "value2"):
            setattr(self, name, nn.Linear(c.hidden, c.co_width))
        self.heads, self.p = c.co_heads, c.attention_dropout

    def forward(self, text, visual, text_bias, visual_bias):
        """(C1: text attends to visual [B, T, W], C2: visual attends to text [B, V, W])."""
        c1 = attend(self.query2(text), self.key1(visual), self.value1(visual), visual_bias,
                    self.heads, self.p, self.training)
        c2 = attend(self.query1(visual), self.key2(text), self.value2(text), text_bias,
                    self.heads, self.p, self.training)
        return c1, c2


class BiOutput(nn.Module):
    """`dense1`/`LayerNorm1` update the visual stream, `dense2`/`LayerNorm2` the text stream."""

    def __init__(self, c: ReferenceConfig):
        super().__init__()
        self.dense1, self.dense2 = nn.Linear(c.co_width, c.hidden), nn.Linear(c.co_width, c.hidden)
        self.LayerNorm1 = nn.LayerNorm(c.hidden, eps=c.eps)
        self.LayerNorm2 = nn.LayerNorm(c.hidden, eps=c.eps)
        self.dropout1, self.dropout2 = nn.Dropout(c.dropout), nn.Dropout(c.dropout)

    def forward(self, c2, visual, c1, text):
        visual = self.LayerNorm1(visual + self.dropout1(self.dense1(c2)))
        text = self.LayerNorm2(text + self.dropout2(self.dense2(c1)))
        return visual, text


class CoLayer(nn.Module):
    """Bidirectional cross-attention (no self-attention), then a post-LN FFN per modality."""

    def __init__(self, c: ReferenceConfig):
        super().__init__()
        self.biattention = BiAttention(c)
        self.biOutput = BiOutput(c)
        self.v_intermediate = Intermediate(c.visual_mlp, c)
        self.v_output = DenseNorm(c.visual_mlp, c)
        self.t_intermediate = Intermediate(c.text_mlp, c)
        self.t_output = DenseNorm(c.text_mlp, c)

    def forward(self, text, visual, text_bias, visual_bias):
        c1, c2 = self.biattention(text, visual, text_bias, visual_bias)
        visual, text = self.biOutput(c2, visual, c1, text)
        return (self.t_output(self.t_intermediate(text), text),
                self.v_output(self.v_intermediate(visual), visual))


class DenseReLU(nn.Module):
    """ReLU(dense(x)): the contrastive poolers (on token 0) and t_fc/v_fc (on every token)."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)

    def forward(self, x):
        return F.relu(self.dense(x))


class Encoder(nn.Module):
    def __init__(self, c: ReferenceConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(c.text_heads, c.text_mlp, c)
                                   for _ in range(c.text_layers))
        self.v_layer = nn.ModuleList(BertLayer(c.visual_heads, c.visual_mlp, c)
                                     for _ in range(c.visual_layers))
        self.c_layer = nn.ModuleList(CoLayer(c) for _ in range(c.co_layers))
        self.t_pooler = DenseReLU(c.hidden, c.out_dim)
        self.v_pooler = DenseReLU(c.hidden, c.out_dim)

    def forward(self, text, visual, text_bias, visual_bias):
        for layer in self.layer:
            text = layer(text, text_bias)
        for layer in self.v_layer:
            visual = layer(visual, visual_bias)
        clr_text, clr_visual = self.t_pooler(text[:, 0]), self.v_pooler(visual[:, 0])
        for layer in self.c_layer:
            text, visual = layer(text, visual, text_bias, visual_bias)
        return text, visual, clr_text, clr_visual


# --------------------------------------------------------------------------- joint encoder
class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class ResBlock(nn.Module):
    """Pre-LN CLIP block: x += MHA(LN(x)); x += c_proj(QuickGELU(c_fc(LN(x))))."""

    def __init__(self, c: ReferenceConfig):
        super().__init__()
        self.attn = nn.MultiheadAttention(c.hidden, c.joint_heads, batch_first=True)
        self.ln_1 = nn.LayerNorm(c.hidden, eps=c.eps)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(c.hidden, c.joint_mlp),
                                             gelu=QuickGELU(),
                                             c_proj=nn.Linear(c.joint_mlp, c.hidden)))
        self.ln_2 = nn.LayerNorm(c.hidden, eps=c.eps)

    def forward(self, x, padding):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, key_padding_mask=padding, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, c: ReferenceConfig):
        super().__init__()
        self.resblocks = nn.ModuleList(ResBlock(c) for _ in range(c.joint_layers))

    def forward(self, x, padding):
        for block in self.resblocks:
            x = block(x, padding)
        return x


class JointPositions(nn.Module):
    def __init__(self, c: ReferenceConfig):
        super().__init__()
        self.position_embeddings = nn.Embedding(c.joint_positions, c.hidden)


class CrossEncoder(nn.Module):
    """Learned positions over [text; visual], dropout, pre-LN blocks, no final LN."""

    def __init__(self, c: ReferenceConfig):
        super().__init__()
        self.embeddings = JointPositions(c)
        self.transformer = Transformer(c)
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, x, mask):
        positions = torch.arange(x.shape[1], device=x.device)
        x = self.dropout(x + self.embeddings.position_embeddings(positions)[None])
        # Bug 1 fixed: a float key-padding mask [B, L] is added per sample to every head.
        return self.transformer(x, (1.0 - mask) * JOINT_MASK_VALUE)


class Bert(nn.Module):
    def __init__(self, c: ReferenceConfig):
        super().__init__()
        self.embeddings = TextEmbeddings(c)
        self.v_embeddings = VisualEmbeddings(c)
        self.encoder = Encoder(c)
        self.cross_encoder = CrossEncoder(c)
        self.t_fc, self.v_fc = DenseReLU(c.hidden, c.out_dim), DenseReLU(c.hidden, c.out_dim)


# --------------------------------------------------------------------------- heads
class Transform(nn.Module):
    def __init__(self, c: ReferenceConfig):
        super().__init__()
        self.dense = nn.Linear(c.hidden, c.hidden)
        self.LayerNorm = nn.LayerNorm(c.hidden, eps=c.eps)

    def forward(self, x):
        return self.LayerNorm(F.gelu(self.dense(x)))


class MLMHead(nn.Module):
    def __init__(self, c: ReferenceConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.transform = Transform(c)
        self.decoder = nn.Linear(c.hidden, c.vocab_size, bias=False)
        self.decoder.weight = word_embeddings.weight  # tied
        self.bias = nn.Parameter(torch.zeros(c.vocab_size))

    def forward(self, x):
        return self.decoder(self.transform(x)) + self.bias


class MRMHead(nn.Module):
    def __init__(self, c: ReferenceConfig):
        super().__init__()
        self.transform = Transform(c)
        self.decoder = nn.Linear(c.hidden, c.feature_dim)

    def forward(self, x):
        return self.decoder(self.transform(x))


class Heads(nn.Module):
    def __init__(self, c: ReferenceConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.t_fc, self.v_fc = nn.Linear(c.out_dim, c.hidden), nn.Linear(c.out_dim, c.hidden)
        self.predictions = MLMHead(c, word_embeddings)
        self.imagePredictions = MRMHead(c)


class CaptureReference(nn.Module):
    """`forward(batch)` -> the pretraining outputs of `CaptureModel.__call__` (same keys)."""

    def __init__(self, c: ReferenceConfig = ReferenceConfig()):
        super().__init__()
        self.bert = Bert(c)
        self.cls = Heads(c, self.bert.embeddings.word_embeddings)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        """N(0, 0.02) weights, zero biases, LN 1/0; the joint in-projection keeps PyTorch's
        Xavier default, as in the reference."""
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        if isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        b, bert = batch["text_ids"].shape[0], self.bert
        feats, boxes = batch["visual_feats"].float(), batch["visual_boxes"].float()
        text_mask, visual_mask = batch["text_mask"].float(), batch["visual_mask"].float()
        targets = feats
        if "mrm_zero" in batch:  # MRM: selected features zeroed, targets kept
            feats = feats * (1.0 - batch["mrm_zero"].float())[..., None]
        # The global token: mean of the real (zeroed) region features, box = the whole image.
        glob = (feats * visual_mask[..., None]).sum(1) / visual_mask.sum(1, True).clamp(min=1.0)
        feats = torch.cat([glob[:, None], feats], 1)
        boxes = torch.cat([feats.new_tensor(GLOBAL_BOX).expand(b, 1, 5), boxes], 1)
        visual_mask = torch.cat([visual_mask.new_ones(b, 1), visual_mask], 1)

        text = bert.embeddings(batch["text_ids"].long())
        visual = bert.v_embeddings(feats, boxes)
        text, visual, clr_text, clr_visual = bert.encoder(
            text, visual, key_bias(text_mask, STREAM_MASK_VALUE),
            key_bias(visual_mask, STREAM_MASK_VALUE))
        joint = bert.cross_encoder(torch.cat([text, visual], 1),
                                   torch.cat([text_mask, visual_mask], 1))
        t = text.shape[1]
        s_text, s_visual = bert.t_fc(joint[:, :t]), bert.v_fc(joint[:, t:])
        return dict(clr_text=clr_text, clr_visual=clr_visual, mrm_targets=targets,
                    pooled_text=s_text[:, 0], pooled_visual=s_visual[:, 0],
                    mlm_logits=self.cls.predictions(self.cls.t_fc(s_text)),
                    mrm_pred=self.cls.imagePredictions(self.cls.v_fc(s_visual[:, 1:])))


# --------------------------------------------------------------------------- losses, step
def compute_losses(outputs, batch, temperature: float = 0.07):
    """MLM + MRM + CLR (weight 1 each) and the components, as `capture_jax.losses`."""
    logits = outputs["mlm_logits"]
    mlm = F.cross_entropy(logits.flatten(0, 1), batch["mlm_labels"].long().flatten(),
                          ignore_index=-1)
    sel = batch["mrm_mask"].float()[..., None]
    err = (outputs["mrm_pred"] - outputs["mrm_targets"]).square() * sel
    mrm = err.sum() / (sel.sum() * err.shape[-1]).clamp(min=1.0)
    b = outputs["clr_text"].shape[0]
    z = F.normalize(torch.cat([outputs["clr_visual"], outputs["clr_text"]]), dim=-1)
    eye = torch.eye(2 * b, dtype=torch.bool, device=z.device)
    sims = (z @ z.T / temperature).masked_fill(eye, -math.inf)
    targets = torch.arange(b, device=z.device)
    clr = F.cross_entropy(sims, torch.cat([targets + b, targets]))
    return mlm + mrm + clr, dict(mlm=mlm, mrm=mrm, clr=clr)


def make_optimizer(model: nn.Module, lr: float = 1e-4, weight_decay: float = 0.01,
                   **adamw_kwargs) -> torch.optim.AdamW:
    """The reference AdamW (betas 0.9/0.999, eps 1e-6), decay on matrices and embeddings only
    (bug 2 fixed: the reference run inverts the groups)."""
    params = list(model.parameters())  # the tied decoder once
    groups = [dict(params=[p for p in params if p.ndim >= 2], weight_decay=weight_decay),
              dict(params=[p for p in params if p.ndim < 2], weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-6, **adamw_kwargs)


def optimizer_update(model: nn.Module, opt: torch.optim.Optimizer, clip_norm: float = 1.0):
    """Clip, AdamW step, and the norms our step reports: (grad norm before clipping, param norm)."""
    params = list(model.parameters())
    grad_norm = nn.utils.clip_grad_norm_(params, clip_norm)
    opt.step()
    with torch.no_grad():
        param_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(params)))
    return grad_norm, param_norm


def train_step(model: nn.Module, opt: torch.optim.Optimizer, batch) -> dict[str, torch.Tensor]:
    """Forward, losses, backward, clip, AdamW; the metrics of our train step."""
    opt.zero_grad(set_to_none=True)
    loss, parts = compute_losses(model(batch), batch)
    loss.backward()
    grad_norm, param_norm = optimizer_update(model, opt)
    return dict(loss=loss.detach(), **{f"loss_{k}": v.detach() for k, v in parts.items()},
                grad_norm=grad_norm, param_norm=param_norm)
