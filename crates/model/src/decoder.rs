//! The decoder-only transformer shared by Qwen2/Qwen2.5, Qwen3 and Llama 3.x, on burn,
//! backend-generic: the same code runs on the wgpu device and on the CPU (flex) device.
//!
//! Token embedding → N × [RMSNorm → grouped-query attention (optional q/k/v/o biases,
//! Qwen3's per-head q/k RMSNorm, rotary embedding in Hugging Face's half-split layout with
//! the config's frequencies) → residual → RMSNorm → SwiGLU MLP → residual] → RMSNorm →
//! lm_head (tied to the embedding when the config says so). The families differ only in
//! what [`ModelConfig`] says, so LoRA, SFT and SAP see one model type.

use burn::module::{Module, Param};
use burn::nn::{Dropout, DropoutConfig};
use burn::tensor::activation::softmax;
use burn::tensor::{Device, Distribution, Int, Tensor, TensorData};

use crate::config::ModelConfig;
use crate::error::Result;
use crate::fused;
use crate::weights::SafetensorsFiles;

/// A linear layer `y = x·W + b`, W stored as [in, out], with an optional LoRA branch
/// `scale · dropout(x)·A·B` (A: [in, r], B: [r, out]).
#[derive(Module, Debug)]
pub struct Linear {
    pub weight: Param<Tensor<2>>,
    pub bias: Option<Param<Tensor<1>>>,
    pub lora: Option<LoraBranch>,
}

#[derive(Module, Debug)]
pub struct LoraBranch {
    pub a: Param<Tensor<2>>,
    pub b: Param<Tensor<2>>,
    pub scale: f64,
    pub dropout: Dropout,
}

impl LoraBranch {
    pub fn new(a: Tensor<2>, b: Tensor<2>, scale: f64, dropout: f64) -> Self {
        Self {
            a: Param::from_tensor(a),
            b: Param::from_tensor(b),
            scale,
            dropout: DropoutConfig::new(dropout).init(),
        }
    }
}

impl Linear {
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        // One [rows, in] × [in, out] product: a broadcast [batch, seq, in] × [1, in, out]
        // runs one smaller product per batch row on the CPU backend, each packing the
        // weight again.
        let mut dims = x.dims();
        let rows = dims[..D - 1].iter().product();
        let x = x.reshape([rows, dims[D - 1]]);
        let mut y = fused::matmul(x.clone(), self.weight.val());
        if let Some(bias) = &self.bias {
            y = y + bias.val().unsqueeze();
        }
        if let Some(lora) = &self.lora {
            let down = lora.dropout.forward(x).matmul(lora.a.val());
            y = y + down.matmul(lora.b.val()).mul_scalar(lora.scale);
        }
        dims[D - 1] = y.dims()[1];
        y.reshape(dims)
    }

    /// The weight with the LoRA branch folded in: W + scale·A·B.
    pub fn merged_weight(&self) -> Tensor<2> {
        match &self.lora {
            None => self.weight.val(),
            Some(lora) => {
                self.weight.val() + lora.a.val().matmul(lora.b.val()).mul_scalar(lora.scale)
            }
        }
    }

    fn load(
        files: &SafetensorsFiles,
        prefix: &str,
        d_in: usize,
        d_out: usize,
        bias: bool,
        device: &Device,
    ) -> Result<Self> {
        let weight = files.tensor2(&format!("{prefix}.weight"), [d_out, d_in], true, device)?;
        let bias = if bias {
            Some(Param::from_tensor(files.tensor1(
                &format!("{prefix}.bias"),
                d_out,
                device,
            )?))
        } else {
            None
        };
        Ok(Self {
            weight: Param::from_tensor(weight),
            bias,
            lora: None,
        })
    }
}

#[derive(Module, Debug)]
pub struct RmsNorm {
    pub weight: Param<Tensor<1>>,
    pub eps: f64,
}

impl RmsNorm {
    /// Normalises over the last dimension (the hidden size, or the head width for Qwen3's
    /// q/k norms).
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let variance = x.clone().powf_scalar(2.0).mean_dim(D - 1);
        let normed = x * variance.add_scalar(self.eps).sqrt().recip();
        normed * self.weight.val().unsqueeze()
    }
}

pub use safeprobe_wire::spec::PROJECTIONS;

#[derive(Module, Debug)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    /// Qwen3's RMSNorms over each query and key head, before the rotary embedding.
    pub q_norm: Option<RmsNorm>,
    pub k_norm: Option<RmsNorm>,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

#[derive(Module, Debug)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

#[derive(Module, Debug)]
pub struct DecoderLayer {
    pub input_layernorm: RmsNorm,
    pub self_attn: Attention,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: Mlp,
}

#[derive(Module, Debug)]
pub struct CausalLm {
    pub embed_tokens: Param<Tensor<2>>,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
    /// `None` when the output projection is tied to the embedding.
    pub lm_head: Option<Linear>,
    /// Rotary inverse frequencies ([`ModelConfig::rope_inv_freq`]), one per pair of head
    /// dimensions.
    #[module(skip)]
    pub rope_inv_freq: Vec<f32>,
}

impl DecoderLayer {
    pub fn projection(&self, name: &str) -> Option<&Linear> {
        Some(match name {
            "q_proj" => &self.self_attn.q_proj,
            "k_proj" => &self.self_attn.k_proj,
            "v_proj" => &self.self_attn.v_proj,
            "o_proj" => &self.self_attn.o_proj,
            "gate_proj" => &self.mlp.gate_proj,
            "up_proj" => &self.mlp.up_proj,
            "down_proj" => &self.mlp.down_proj,
            _ => return None,
        })
    }
    pub fn projection_mut(&mut self, name: &str) -> Option<&mut Linear> {
        Some(match name {
            "q_proj" => &mut self.self_attn.q_proj,
            "k_proj" => &mut self.self_attn.k_proj,
            "v_proj" => &mut self.self_attn.v_proj,
            "o_proj" => &mut self.self_attn.o_proj,
            "gate_proj" => &mut self.mlp.gate_proj,
            "up_proj" => &mut self.mlp.up_proj,
            "down_proj" => &mut self.mlp.down_proj,
            _ => return None,
        })
    }
    /// Hugging Face module path of a projection inside a layer.
    pub fn projection_path(layer: usize, name: &str) -> String {
        let block = if matches!(name, "gate_proj" | "up_proj" | "down_proj") {
            "mlp"
        } else {
            "self_attn"
        };
        format!("model.layers.{layer}.{block}.{name}")
    }
}

/// Per-layer keys and values of everything already processed, so that generation feeds
/// only the new token each step. Stored after rotary embedding, before head repetition.
#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<(Tensor<4>, Tensor<4>)>,
}

impl KvCache {
    pub fn len(&self) -> usize {
        self.layers.first().map(|(k, _)| k.dims()[2]).unwrap_or(0)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Per-row token positions and key validity for one forward call, computed on the host.
///
/// `key_mask[b]` covers every key the call attends to (cached + new); padding is `false`.
/// Positions follow Hugging Face's `cumsum(attention_mask) - 1`, so left-padded batches get
/// the same rotary angles as unpadded single prompts.
pub struct AttentionLayout {
    pub key_mask: Vec<Vec<bool>>,
}

impl AttentionLayout {
    fn tensors(
        &self,
        new_len: usize,
        inv_freq: &[f32],
        device: &Device,
    ) -> (Tensor<4>, Tensor<4>, Tensor<4>) {
        let batch = self.key_mask.len();
        let total = self.key_mask[0].len();
        let past = total - new_len;
        let half = inv_freq.len();
        let head_dim = 2 * half;
        let mut cos = Vec::with_capacity(batch * new_len * head_dim);
        let mut sin = Vec::with_capacity(batch * new_len * head_dim);
        let mut bias = Vec::with_capacity(batch * new_len * total);
        for row in &self.key_mask {
            let mut position = row[..past].iter().filter(|v| **v).count() as i64;
            for q in 0..new_len {
                let pos = if row[past + q] { position } else { 1 };
                if row[past + q] {
                    position += 1;
                }
                for k in 0..head_dim {
                    let angle = pos as f32 * inv_freq[k % half];
                    cos.push(angle.cos());
                    sin.push(angle.sin());
                }
                for (k, valid) in row.iter().enumerate() {
                    let visible = *valid && k <= past + q;
                    bias.push(if visible { 0.0 } else { -1e9 });
                }
            }
        }
        let cos = Tensor::from_data(TensorData::new(cos, [batch, 1, new_len, head_dim]), device);
        let sin = Tensor::from_data(TensorData::new(sin, [batch, 1, new_len, head_dim]), device);
        let bias = Tensor::from_data(TensorData::new(bias, [batch, 1, new_len, total]), device);
        (cos, sin, bias)
    }
}

fn rotate_half(x: Tensor<4>) -> Tensor<4> {
    let half = x.dims()[3] / 2;
    let x1 = x.clone().narrow(3, 0, half);
    let x2 = x.narrow(3, half, half);
    Tensor::cat(vec![x2.neg(), x1], 3)
}

impl Attention {
    fn forward(
        &self,
        x: Tensor<3>,
        cos: &Tensor<4>,
        sin: &Tensor<4>,
        bias: &Tensor<4>,
        cache: Option<&mut (Tensor<4>, Tensor<4>)>,
    ) -> (Tensor<3>, Tensor<4>, Tensor<4>) {
        let [b, s, _] = x.dims();
        let (h, kvh, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let heads = |t: Tensor<3>, n: usize, norm: &Option<RmsNorm>| {
            let t = t.reshape([b, s, n, hd]);
            match norm {
                Some(norm) => norm.forward(t),
                None => t,
            }
            .swap_dims(1, 2)
        };
        let q = heads(self.q_proj.forward(x.clone()), h, &self.q_norm);
        let k = heads(self.k_proj.forward(x.clone()), kvh, &self.k_norm);
        let v = heads(self.v_proj.forward(x), kvh, &None);
        let q = q.clone() * cos.clone() + rotate_half(q) * sin.clone();
        let mut k = k.clone() * cos.clone() + rotate_half(k) * sin.clone();
        let mut v = v;
        if let Some((past_k, past_v)) = cache {
            k = Tensor::cat(vec![past_k.clone(), k], 2);
            v = Tensor::cat(vec![past_v.clone(), v], 2);
        }
        // Each of the kvh key/value heads serves h / kvh query heads (grouped-query attention).
        let scores = fused::head_matmul(q, k.clone().swap_dims(2, 3))
            .mul_scalar(1.0 / (hd as f64).sqrt())
            + bias.clone();
        let attn = fused::head_matmul(softmax(scores, 3), v.clone());
        let out = attn.swap_dims(1, 2).reshape([b, s, h * hd]);
        (self.o_proj.forward(out), k, v)
    }
}

impl Mlp {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        self.down_proj.forward(fused::swiglu(
            self.gate_proj.forward(x.clone()),
            self.up_proj.forward(x),
        ))
    }
}

impl CausalLm {
    /// Builds the model from checkpoint tensors (Hugging Face names), one tensor at a time.
    pub fn load(config: &ModelConfig, files: &SafetensorsFiles, device: &Device) -> Result<Self> {
        let norm = |name: String, width: usize| -> Result<RmsNorm> {
            Ok(RmsNorm {
                weight: Param::from_tensor(files.tensor1(&name, width, device)?),
                eps: config.rms_norm_eps,
            })
        };
        let linear = |name: String, [d_in, d_out]: [usize; 2], bias: bool| {
            Linear::load(files, &name, d_in, d_out, bias, device)
        };
        let qk_norm = config.architecture.qk_norm();
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let shape = |name: &str| LayerShapes::of(config).linear(name);
            let attn =
                |name: &str, bias: bool| linear(format!("{p}.self_attn.{name}"), shape(name), bias);
            let mlp = |name: &str| linear(format!("{p}.mlp.{name}"), shape(name), false);
            let head_norm = |name: &str| -> Result<Option<RmsNorm>> {
                qk_norm
                    .then(|| norm(format!("{p}.self_attn.{name}.weight"), config.head_dim))
                    .transpose()
            };
            layers.push(DecoderLayer {
                input_layernorm: norm(format!("{p}.input_layernorm.weight"), config.hidden_size)?,
                self_attn: Attention {
                    q_proj: attn("q_proj", config.qkv_bias)?,
                    k_proj: attn("k_proj", config.qkv_bias)?,
                    v_proj: attn("v_proj", config.qkv_bias)?,
                    o_proj: attn("o_proj", config.o_bias)?,
                    q_norm: head_norm("q_norm")?,
                    k_norm: head_norm("k_norm")?,
                    num_heads: config.num_attention_heads,
                    num_kv_heads: config.num_key_value_heads,
                    head_dim: config.head_dim,
                },
                post_attention_layernorm: norm(
                    format!("{p}.post_attention_layernorm.weight"),
                    config.hidden_size,
                )?,
                mlp: Mlp {
                    gate_proj: mlp("gate_proj")?,
                    up_proj: mlp("up_proj")?,
                    down_proj: mlp("down_proj")?,
                },
            });
        }
        let embed = files.tensor2(
            "model.embed_tokens.weight",
            [config.vocab_size, config.hidden_size],
            false,
            device,
        )?;
        // Some tied checkpoints still carry an lm_head copy; tied means the embedding is used.
        let lm_head = if config.tie_word_embeddings {
            None
        } else {
            Some(linear(
                "lm_head".into(),
                [config.hidden_size, config.vocab_size],
                false,
            )?)
        };
        Ok(Self {
            embed_tokens: Param::from_tensor(embed),
            layers,
            norm: norm("model.norm.weight".into(), config.hidden_size)?,
            lm_head,
            rope_inv_freq: config.rope_inv_freq(),
        })
    }

    /// A randomly initialised model (N(0, 0.02) weights, unit norms, zero biases) for
    /// benchmarks and demos that need no checkpoint.
    pub fn random(config: &ModelConfig, device: &Device) -> Self {
        let shapes = LayerShapes::of(config);
        let normal =
            |shape: [usize; 2]| Tensor::random(shape, Distribution::Normal(0.0, 0.02), device);
        let linear = |[d_in, d_out]: [usize; 2], bias: bool| Linear {
            weight: Param::from_tensor(normal([d_in, d_out])),
            bias: bias.then(|| Param::from_tensor(Tensor::zeros([d_out], device))),
            lora: None,
        };
        let norm = |width: usize| RmsNorm {
            weight: Param::from_tensor(Tensor::ones([width], device)),
            eps: config.rms_norm_eps,
        };
        let head_norm = || config.architecture.qk_norm().then(|| norm(config.head_dim));
        let layers = (0..config.num_hidden_layers)
            .map(|_| DecoderLayer {
                input_layernorm: norm(config.hidden_size),
                self_attn: Attention {
                    q_proj: linear(shapes.linear("q_proj"), config.qkv_bias),
                    k_proj: linear(shapes.linear("k_proj"), config.qkv_bias),
                    v_proj: linear(shapes.linear("v_proj"), config.qkv_bias),
                    o_proj: linear(shapes.linear("o_proj"), config.o_bias),
                    q_norm: head_norm(),
                    k_norm: head_norm(),
                    num_heads: config.num_attention_heads,
                    num_kv_heads: config.num_key_value_heads,
                    head_dim: config.head_dim,
                },
                post_attention_layernorm: norm(config.hidden_size),
                mlp: Mlp {
                    gate_proj: linear(shapes.linear("gate_proj"), false),
                    up_proj: linear(shapes.linear("up_proj"), false),
                    down_proj: linear(shapes.linear("down_proj"), false),
                },
            })
            .collect();
        Self {
            embed_tokens: Param::from_tensor(normal([config.vocab_size, config.hidden_size])),
            layers,
            norm: norm(config.hidden_size),
            lm_head: (!config.tie_word_embeddings)
                .then(|| linear([config.hidden_size, config.vocab_size], false)),
            rope_inv_freq: config.rope_inv_freq(),
        }
    }

    /// Final hidden states [batch, new_len, hidden] for `input_ids` [batch, new_len].
    ///
    /// `layout.key_mask` covers cached and new tokens. With a cache, the new keys and values
    /// are appended to it. `hidden_offsets[l]`, when present, is added to the output of layer
    /// `l` (the hook Safety-Aware Probing perturbs).
    pub fn forward_hidden(
        &self,
        input_ids: Tensor<2, Int>,
        layout: &AttentionLayout,
        mut cache: Option<&mut KvCache>,
        hidden_offsets: &[Option<Tensor<3>>],
    ) -> Tensor<3> {
        let [b, s] = input_ids.dims();
        let device = input_ids.device();
        let hidden = self.embed_tokens.dims()[1];
        let (cos, sin, bias) = layout.tensors(s, &self.rope_inv_freq, &device);
        let mut x = self
            .embed_tokens
            .val()
            .select(0, input_ids.reshape([b * s]))
            .reshape([b, s, hidden]);
        for (l, layer) in self.layers.iter().enumerate() {
            let past = cache.as_deref_mut().and_then(|c| c.layers.get_mut(l));
            let (attn, k, v) = layer.self_attn.forward(
                layer.input_layernorm.forward(x.clone()),
                &cos,
                &sin,
                &bias,
                past,
            );
            if let Some(c) = cache.as_deref_mut() {
                if l < c.layers.len() {
                    c.layers[l] = (k, v);
                } else {
                    c.layers.push((k, v));
                }
            }
            x = x + attn;
            x = x.clone() + layer.mlp.forward(layer.post_attention_layernorm.forward(x));
            if let Some(Some(offset)) = hidden_offsets.get(l) {
                x = x + offset.clone();
            }
        }
        self.norm.forward(x)
    }

    /// Logits over the vocabulary for final hidden states.
    pub fn logits(&self, hidden: Tensor<3>) -> Tensor<3> {
        match &self.lm_head {
            Some(head) => head.forward(hidden),
            None => {
                let [b, s, h] = hidden.dims();
                let logits = fused::matmul(
                    hidden.reshape([b * s, h]),
                    self.embed_tokens.val().transpose(),
                );
                let vocab = logits.dims()[1];
                logits.reshape([b, s, vocab])
            }
        }
    }

    pub fn forward(
        &self,
        input_ids: Tensor<2, Int>,
        layout: &AttentionLayout,
        cache: Option<&mut KvCache>,
    ) -> Tensor<3> {
        self.logits(self.forward_hidden(input_ids, layout, cache, &[]))
    }
}

/// [in, out] of each projection of a decoder layer.
struct LayerShapes {
    hidden: usize,
    intermediate: usize,
    q: usize,
    kv: usize,
}

impl LayerShapes {
    fn of(config: &ModelConfig) -> Self {
        Self {
            hidden: config.hidden_size,
            intermediate: config.intermediate_size,
            q: config.q_width(),
            kv: config.kv_width(),
        }
    }

    fn linear(&self, projection: &str) -> [usize; 2] {
        let Self {
            hidden,
            intermediate,
            q,
            kv,
        } = *self;
        match projection {
            "q_proj" => [hidden, q],
            "k_proj" | "v_proj" => [hidden, kv],
            "o_proj" => [q, hidden],
            "gate_proj" | "up_proj" => [hidden, intermediate],
            "down_proj" => [intermediate, hidden],
            other => unreachable!("no projection named {other}"),
        }
    }
}

/// [in, out] of a decoder layer's projection (`q_proj`, ..., `down_proj`; see `PROJECTIONS`).
pub fn projection_shape(config: &ModelConfig, projection: &str) -> [usize; 2] {
    LayerShapes::of(config).linear(projection)
}

/// Parameter count, from the config alone.
pub fn parameter_count(config: &ModelConfig) -> usize {
    let shapes = LayerShapes::of(config);
    let weights: usize = PROJECTIONS
        .iter()
        .map(|name| shapes.linear(name).iter().product::<usize>())
        .sum();
    let biases = if config.qkv_bias {
        config.q_width() + 2 * config.kv_width()
    } else {
        0
    } + if config.o_bias { config.hidden_size } else { 0 };
    let qk_norms = if config.architecture.qk_norm() {
        2 * config.head_dim
    } else {
        0
    };
    let layer = weights + biases + qk_norms + 2 * config.hidden_size;
    let (h, v) = (config.hidden_size, config.vocab_size);
    let head = if config.tie_word_embeddings { 0 } else { h * v };
    v * h + config.num_hidden_layers * layer + h + head
}
