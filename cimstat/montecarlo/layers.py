"""Analog Conv2d / Linear modules: one chip instance of one layer, bit-accurate.

A layer is computed as a matrix product over *input vectors* (one per image for Linear,
one per output position of every image for Conv2d, im2col rows in PyTorch's
``weight.reshape(C_out, -1)`` order). For quantized inputs and weights, per input vector:

1. input codes ``q`` (signed or unsigned, see :mod:`cimstat.hardware`) -> input passes:
   unsigned: the slices of ``q``; signed ``split``: the slices of ``max(q,0)`` (sign +1) and of
   ``max(-q,0)`` (sign -1); signed ``offset``: the slices of ``u = q + 2^(b-1)``;
2. per (pass, weight slice, row tile, ADC channel) one partial sum
   ``P = Σ_{k in tile} x_k · c_k`` where ``c_k = max(0, g_k + e_p,k + e_r,k)`` is the device's read
   conductance (device levels); ADC channels are: the difference of the G+/G- pair
   (differential, ``difference``), each of G+ and G- (differential, ``separate``; G- enters
   with sign -1), or the single offset device;
3. ADC thermal noise + quantization of each partial sum, then digital shift-and-add
   ``Σ_pass sign·2^{o_i} (Σ_j 2^{o_j} Σ_tiles ADC(P) - [offset weights] 2^(b_w-1)·Σ_k x_k)``,
   minus ``2^(b_in-1)·Σ_k qw_k`` for offset-encoded signed inputs, times ``Δx·Δw_c``, plus bias.

Float inputs or float weights (``input_bits``/``weight_bits`` None) skip 1-3: the output is the
float product of the (possibly quantized) inputs and weights.

Computation
    All conversions of a chunk of input vectors are one batched product
    ``(tiles, passes·vectors, rows) x (tiles, rows, ADC channels·C_out)``; the ADC then works
    elementwise with the step of each (input slice, weight slice). Integer sums are exact: the
    partial sums run in float32 only while ``n_rows·L_in·L_w < 2^24`` (else float64) and the
    shift-and-add runs in float64. Chunks keep every intermediate below ``WORK_ELEMENTS``
    elements, so memory stays bounded for any image size. When every conversion is ideal and
    noiseless (``adc_bits=None``, no thermal noise, no device noise) slicing, tiling and
    encodings are provably invisible (the tests pin this), and ``forward`` computes the integer
    product ``Σ q_k·qw_k`` with the layer's own operator instead (exact in its dtype).

Noise and random streams
    Programming errors ``e_p`` are drawn once per chip (at construction) from a generator seeded with
    ``SeedSequence([chip_seed, crc32(layer name), 0])`` (``chip_seed = config.seed + instance``).
    Read noise ``e_r`` and ADC thermal noise come from a second generator,
    ``SeedSequence([chip_seed, crc32(name), 1])``, that advances at every call
    (:meth:`AnalogLayer.reset_noise` rewinds it): the same chip seed and the same sequence of
    inputs give the same outputs.

Devices
    ``device="cuda"`` runs the layer on a GPU. Weight codes, programming errors and the device matrices are
    built on the CPU (its generator draws the programming errors) and then moved, so a chip is the same chip on
    every device; the read/thermal stream is a generator of the device itself (same seed, other draws). Chunks
    are larger there (``CUDA_WORK_ELEMENTS``), and ``forward`` switches TF32 off while it runs (:func:`exact_float32`).
    The layer's tensors are plain attributes: ``.to()`` on a converted model does not move them (convert again).

Read noise: exact and fast modes
    ``exact_read_noise=True`` draws one ``e_r`` per device, input vector and pass and clips the
    conductance at 0 (costs ``K·C_out`` normals per input vector and pass; tiny layers only).
    The default fast mode draws, per partial sum, ``P = Σ x_k m_k + sqrt(Σ x_k² v_k)·z`` with
    ``m_k, v_k`` the mean and variance of the rectified Gaussian ``max(0, h_k + e_r)``
    (``h_k = g_k + e_p,k``). Where no device can clip (``σ_r = 0`` or ``h_k ≫ σ_r``) this is
    exactly the distribution of the bit-accurate sum (a sum of independent Gaussians); where
    devices sit near 0 (state-independent noise on off devices) mean and variance stay exact
    and only the shape is the Gaussian of the central limit theorem (measured against the
    exact mode in ``tests/test_montecarlo_noise.py``: SNR within 0.15 dB, inside the spread
    between chip seeds, for 4-128 rows per array with 1-2 bit slices and 3-6 bit ADCs; on the
    default model's layer1.0.conv1 with bit-serial inputs, 2-bit weight slices, a 6-bit ADC and
    α = 0.01-0.05, within 0.07 dB). ADC
    thermal noise is independent of read noise, so without an observer one normal of their
    summed variance is drawn per conversion.

Partial-sum observer
    ``layer.partial_sum_observer = fn`` (or :func:`cimstat.montecarlo.set_partial_sum_observer`)
    makes every conversion call ``fn(layer_name, input_slice, weight_slice, tensor)`` with the
    analog value the ADC is about to convert (partial-sum units, read noise included, thermal
    noise not yet added), ``tensor`` of shape ``(tiles, input vectors, C_out)``. ``input_slice``
    and ``weight_slice`` index the ADC range table ``[input slice][weight slice]``; a signed
    ``split`` input calls once for the positive and once for the negative pass of a slice, and
    ``separate`` ADC mode once for G+ and once for G-. Used by :mod:`cimstat.calibrate` to profile
    ADC inputs.
"""
from __future__ import annotations

import contextlib
import math
import zlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cimstat.errors import ConfigError
from cimstat.hardware import LayerConfig, LayerRanges, NoiseModel, SignedInputEncoding, WeightEncoding, WeightScale
from cimstat.montecarlo.quantize import (
    adc_convert,
    adc_code_limits,
    adc_step,
    bit_slice,
    input_codes,
    input_step,
    rectified_gaussian_moments,
    slice_offsets,
    weight_codes,
)

__all__ = ["AnalogLayer", "PartialSumObserver", "stream_seed", "exact_float32", "EXACT_SUM_LIMIT"]

PartialSumObserver = Callable[[str, int, int, torch.Tensor], None]

EXACT_SUM_LIMIT = 2 ** 24
"""Integer sums below this are exact in float32; larger bounds make the layer compute in float64."""

WORK_ELEMENTS = 2 ** 23
"""Largest intermediate tensor (elements) one chunk of input vectors may create on the CPU (32-64 MB)."""

CUDA_WORK_ELEMENTS = 2 ** 26
"""The same on a CUDA device (256-512 MB): larger chunks keep a GPU busy between kernel launches."""


@contextlib.contextmanager
def exact_float32(device: torch.device):
    """No TF32 in matrix products and convolutions while the block runs (CUDA only; the caller's settings are
    restored after): integer codes then sum exactly in float32, as on the CPU."""
    if device.type != "cuda":
        yield
        return
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def stream_seed(chip_seed: int, layer_name: str, stream: int) -> int:
    """A 63-bit seed for one random stream (0 programming, 1 read/thermal) of one layer of one chip."""
    state = np.random.SeedSequence([int(chip_seed), zlib.crc32(layer_name.encode()), int(stream)])
    return int(state.generate_state(1, dtype=np.uint64)[0] & ((1 << 63) - 1))


@dataclass
class _AdcChannel:
    """What one ADC converts for one weight slice: tiled device matrices, all ``(tiles, n_rows, C_out)``."""

    sign: float
    """+1, or -1 for the G- conversion in ``separate`` mode."""
    mean: torch.Tensor | None
    """Expected read conductance ``E[c]`` (difference mode: ``E[c+] - E[c-]``); None once concatenated."""
    var: torch.Tensor | None
    """Read-noise variance of the conductance (difference mode: sum of the pair's), None if no read noise."""
    programmed: list[tuple[float, torch.Tensor, torch.Tensor]]
    """Exact mode: ``(polarity sign, h = g + e_p, σ_r)`` per device array in this conversion."""


class AnalogLayer(nn.Module):
    """One chip instance of an analog Conv2d or Linear layer (see the module docstring)."""

    def __init__(self, name: str, module: nn.Conv2d | nn.Linear, config: LayerConfig, ranges: LayerRanges,
                 chip_seed: int, *, exact_read_noise: bool = False, precision: str = "auto",
                 device: str | torch.device = "cpu") -> None:
        super().__init__()
        if precision not in ("auto", "float64"):
            raise ConfigError(f"precision={precision!r} must be 'auto' (float32 where integer sums are exact, "
                              "else float64) or 'float64'")
        self.precision = precision
        self.device = torch.device(device)
        self.work_elements = CUDA_WORK_ELEMENTS if self.device.type == "cuda" else WORK_ELEMENTS
        if isinstance(module, nn.Conv2d):
            if module.groups != 1:
                raise ConfigError(f"layer {name}: groups={module.groups}; the simulator maps only groups=1 convs")
            if module.padding_mode != "zeros" or isinstance(module.padding, str):
                raise ConfigError(f"layer {name}: only zero padding given as numbers is supported")
            self.kind = "conv"
            self.kernel_size = tuple(module.kernel_size)
            self.stride = tuple(module.stride)
            self.padding = tuple(module.padding)
            self.dilation = tuple(module.dilation)
        elif isinstance(module, nn.Linear):
            self.kind = "linear"
        else:
            raise TypeError(f"layer {name}: expected nn.Conv2d or nn.Linear, got {type(module).__name__}")
        self.name = name
        self.config = config
        self.ranges = ranges
        self.chip_seed = int(chip_seed)
        self.exact_read_noise = bool(exact_read_noise)
        self.partial_sum_observer: PartialSumObserver | None = None
        weight = module.weight.detach().to("cpu", torch.float32)
        self.out_channels = int(weight.shape[0])
        self.weight_matrix = weight.reshape(self.out_channels, -1).clone()
        self.fan_in = int(self.weight_matrix.shape[1])
        self.bias = None if module.bias is None else module.bias.detach().to("cpu", torch.float32).clone()
        self._check_ranges()
        self._integer = config.input_bits is not None and config.weight_bits is not None
        self._read_gen = torch.Generator(device=self.device)
        self.reset_noise()
        self._prepare_weights()
        self._move_to_device()

    # ------------------------------------------------------------------ setup
    def _check_ranges(self) -> None:
        c, r, name = self.config, self.ranges, self.name
        if c.input_bits is not None:
            if r.input_range is None or not (isinstance(r.input_range, (int, float, np.floating))
                                             and math.isfinite(r.input_range) and r.input_range > 0):
                raise ConfigError(f"layer {name}: resolved input_range={r.input_range!r} must be a positive finite "
                                  "number (input units) when input_bits is set")
            if r.signed_input and c.input_bits < 2:
                raise ConfigError(f"layer {name}: input_bits={c.input_bits} cannot encode a signed input; "
                                  "a signed input needs input_bits >= 2")
        self.signed_input = bool(r.signed_input)
        if c.adc_bits is not None:
            in_slices = c.input_slices(self.signed_input)
            shape = (len(in_slices), len(c.weight_slices()))
            table = None if r.adc_range is None else np.asarray(r.adc_range, dtype=np.float64)
            if table is not None and table.ndim == 0:
                table = np.full(shape, float(table))
            if table is None or table.shape != shape or not np.all(np.isfinite(table)) or np.any(table <= 0):
                raise ConfigError(f"layer {name}: resolved adc_range must be positive finite numbers of shape "
                                  f"(input slices, weight slices) = {shape}; got "
                                  f"{None if table is None else table.tolist()!r}")
            self.adc_table = table
        else:
            self.adc_table = None

    def _prepare_weights(self) -> None:
        c = self.config
        if c.weight_bits is None:
            self.qw = None
            self.weight_step = None
            self.float_weight = self.weight_matrix
            return
        qw, step = weight_codes(self.weight_matrix, c.weight_bits, per_channel=c.weight_scale is WeightScale.PER_CHANNEL)
        self.qw, self.weight_step = qw, step
        self.float_weight = (qw.to(torch.float64) * step[:, None]).to(torch.float32)
        if not self._integer:
            return
        # integer path: devices, tiles, dtype
        self.in_widths = c.input_slices(self.signed_input)
        self.w_widths = c.weight_slices()
        self.in_offsets = slice_offsets(self.in_widths)
        self.w_offsets = slice_offsets(self.w_widths)
        self.n_rows = c.n_rows(self.fan_in)
        self.n_tiles = c.n_tiles(self.fan_in)
        in_bits = c.input_magnitude_bits(self.signed_input)
        bound = self.n_rows * max(2 ** s - 1 for s in self.in_widths) * max(2 ** s - 1 for s in self.w_widths)
        wide = bound >= EXACT_SUM_LIMIT or in_bits > 23 or self.precision == "float64"
        self.dtype = torch.float64 if wide else torch.float32
        self.channels: list[list[_AdcChannel]] | None = None  # programmed on first use (see _program_devices)
        if not self.lossless:
            self._program_devices()

    def _program_devices(self) -> None:
        """Draw this chip's programming errors and build the device matrices of every weight slice.

        A lossless layer (ideal, noiseless conversions) defers this until the sliced path is asked for
        (an observer, :meth:`integer_outputs`): its ``forward`` never reads devices. The draws depend
        only on the chip seed and the layer name, so deferring changes nothing."""
        if self.channels is not None:
            return
        c, qw = self.config, self.qw.cpu()  # drawn and built on the CPU, then moved (see _move_to_device)
        if c.weight_encoding is WeightEncoding.DIFFERENTIAL:
            polarities = [(1.0, torch.clamp(qw, min=0)), (-1.0, torch.clamp(-qw, min=0))]
        else:
            polarities = [(1.0, qw + 2 ** (c.weight_bits - 1))]
        prog_gen = torch.Generator().manual_seed(stream_seed(self.chip_seed, self.name, 0))
        channels: list[list[_AdcChannel]] = []
        for width, offset in zip(self.w_widths, self.w_offsets):
            level_max = 2 ** width - 1
            arrays = []  # (sign, h, sigma_r) per polarity
            for sign, codes in polarities:
                g = bit_slice(codes, offset, width).to(torch.float64)
                h = g
                if c.programming_error > 0:
                    sigma_p = self._sigma(c.programming_error, c.programming_error_model, g, level_max)
                    h = g + sigma_p * torch.randn(g.shape, dtype=torch.float64, generator=prog_gen)
                sigma_r = self._sigma(c.read_noise, c.read_noise_model, g, level_max) if c.read_noise > 0 else None
                arrays.append((sign, h, sigma_r))
            channels.append(self._adc_channels(arrays))
        self.channels = channels
        self._build_columns()
        self._move_to_device()

    def _move_to_device(self) -> None:
        """Put every tensor ``forward`` reads on :attr:`device`. Weight codes and programming errors are
        computed on the CPU (its generator draws them), so a chip is the same device by device; only the
        read-noise / thermal-noise stream is the device's own generator."""
        if self.device.type == "cpu":
            return
        dev = self.device
        for attr in ("weight_matrix", "bias", "qw", "weight_step", "float_weight", "_column_coef", "_mean_all",
                     "_var_all", "_adc_steps"):
            value = getattr(self, attr, None)
            if isinstance(value, torch.Tensor):
                setattr(self, attr, value.to(dev))
        for chans in getattr(self, "channels", None) or []:  # float layers have no device arrays
            for ch in chans:
                ch.programmed = [(sign, h.to(dev), s.to(dev)) for sign, h, s in ch.programmed]

    @staticmethod
    def _sigma(alpha: float, model: NoiseModel, g: torch.Tensor, level_max: int) -> torch.Tensor:
        """σ in device levels: ``α·L`` (state independent) or ``α·g`` (proportional)."""
        if model is NoiseModel.PROPORTIONAL:
            return alpha * g
        return torch.full_like(g, alpha * level_max)

    def _tile(self, matrix: torch.Tensor) -> torch.Tensor:
        """``(C_out, K)`` -> ``(tiles, n_rows, C_out)`` with zero rows padding the last tile."""
        pad = self.n_tiles * self.n_rows - self.fan_in
        m = F.pad(matrix, (0, pad)) if pad else matrix
        return m.reshape(self.out_channels, self.n_tiles, self.n_rows).permute(1, 2, 0).contiguous().to(self.dtype)

    def _adc_channels(self, arrays: list[tuple[float, torch.Tensor, torch.Tensor | None]]) -> list[_AdcChannel]:
        moments = []
        for sign, h, sigma_r in arrays:
            if sigma_r is None:
                moments.append((sign, torch.clamp(h, min=0.0), None))
            else:
                mean, var = rectified_gaussian_moments(h, sigma_r)
                moments.append((sign, mean, var))
        exact = self.exact_read_noise and arrays[0][2] is not None
        if self.config.adc_signed:  # differential pair, difference current
            mean = moments[0][1] - moments[1][1]
            var = None if moments[0][2] is None else moments[0][2] + moments[1][2]
            programmed = [(sign, self._tile(h), self._tile(s)) for sign, h, s in arrays] if exact else []
            return [_AdcChannel(1.0, self._tile(mean), None if var is None else self._tile(var), programmed)]
        # one conversion per device array (separate mode, offset weights): the channel sign is applied digitally
        return [_AdcChannel(sign, self._tile(mean), None if var is None else self._tile(var),
                            [(1.0, self._tile(h), self._tile(s))] if exact else [])
                for (sign, mean, var), (_, h, s) in zip(moments, arrays)]

    def reset_noise(self) -> None:
        """Rewind the read-noise / thermal-noise stream to its start (programming errors stay)."""
        self._read_gen.manual_seed(stream_seed(self.chip_seed, self.name, 1))

    def sample_conductances(self, weight_slice: int, n_reads: int) -> torch.Tensor:
        """``n_reads`` independent reads of every device of one weight slice (exact read-noise mode),
        device levels, ``(n_reads, polarities, C_out, K)``: ``max(0, g + e_p + e_r)``, fresh ``e_r`` per read."""
        if not self._integer or not self.exact_read_noise or self.config.read_noise == 0:
            raise ConfigError(f"layer {self.name}: sample_conductances needs quantized inputs and weights, "
                              "read_noise > 0 and exact_read_noise=True")
        self._program_devices()
        out = []
        for ch in self.channels[weight_slice]:
            for _sign, h, sigma in ch.programmed:
                reads = h.unsqueeze(0) + sigma.unsqueeze(0) * torch.randn((n_reads,) + tuple(h.shape), dtype=h.dtype,
                                                                          device=h.device, generator=self._read_gen)
                reads = torch.clamp(reads, min=0.0)  # (reads, T, n, C) -> (reads, C, K)
                reads = reads.permute(0, 3, 1, 2).reshape(n_reads, self.out_channels, -1)[:, :, :self.fan_in]
                out.append(reads)
        return torch.stack(out, dim=1)

    # ------------------------------------------------------------------ forward
    def extra_repr(self) -> str:
        return f"name={self.name!r}, kind={self.kind}, fan_in={self.fan_in}, out={self.out_channels}, chip={self.chip_seed}"

    @property
    def lossless(self) -> bool:
        """True when every conversion is ideal and noiseless: slicing, tiling and encodings are then
        invisible (``Σ_k q_k·qw_k`` exactly, pinned by the tests), so :meth:`forward` computes the
        integer product in one operator unless a partial-sum observer asks for the conversions."""
        c = self.config
        return (self._integer and c.adc_bits is None and c.adc_thermal_noise_lsb == 0 and c.read_noise == 0
                and c.programming_error == 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            with exact_float32(self.device):
                return self._forward(x)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._integer:
            return self._float_forward(x)
        if self.lossless and self.partial_sum_observer is None:
            return self._lossless_forward(x)
        if self.kind == "linear":
            lead = x.shape[:-1]
            y = self._vectors(x.reshape(-1, x.shape[-1]))
            return y.reshape(*lead, self.out_channels)
        n, _, h, w = x.shape
        kh, kw = self.kernel_size
        h_out = (h + 2 * self.padding[0] - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
        w_out = (w + 2 * self.padding[1] - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
        positions = h_out * w_out
        per_image = max(1, self.work_elements // max(1, self.fan_in * positions))
        outs = []
        for start in range(0, n, per_image):
            chunk = x[start:start + per_image]
            cols = F.unfold(chunk, self.kernel_size, dilation=self.dilation, padding=self.padding, stride=self.stride)
            vecs = cols.transpose(1, 2).reshape(-1, self.fan_in)
            y = self._vectors(vecs)
            outs.append(y.reshape(chunk.shape[0], positions, self.out_channels).transpose(1, 2)
                         .reshape(chunk.shape[0], self.out_channels, h_out, w_out))
        return torch.cat(outs, dim=0)

    def _float_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Float inputs or float weights: the layer's own operator on dequantized operands (the
        elementwise input quantizer maps the zero padding to zero, so it commutes with im2col)."""
        c = self.config
        if c.input_bits is not None:
            q, step = input_codes(x.to(torch.float64), self.ranges.input_range, c.input_bits, self.signed_input)
            x = (q * step).to(torch.float32)
        if self.kind == "linear":
            return F.linear(x, self.float_weight, self.bias)
        weight = self.float_weight.reshape(self.out_channels, -1, *self.kernel_size)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation)

    def _lossless_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``Δx·Δw_c·Σ_k q_k·qw_k + bias`` with the layer's own operator, in a dtype where the integer
        sum is exact (float64 when ``K·max|q|·max|qw|`` reaches 2^24)."""
        c = self.config
        q, _ = input_codes(x.to(torch.float64), self.ranges.input_range, c.input_bits, self.signed_input)
        bound = self.fan_in * float(q.abs().max()) * float(self.qw.abs().max())
        dtype = torch.float64 if (bound >= EXACT_SUM_LIMIT or self.precision == "float64") else torch.float32
        weight = self.qw.to(dtype)
        if self.kind == "linear":
            acc = F.linear(q.to(dtype), weight)
        else:
            acc = F.conv2d(q.to(dtype), weight.reshape(self.out_channels, -1, *self.kernel_size), None,
                           self.stride, self.padding, self.dilation)
        scale = self.input_step() * self.weight_step.to(torch.float64)
        scale = scale.reshape((-1,) + (1,) * (acc.dim() - 2)) if self.kind == "conv" else scale
        y = (acc.to(torch.float64) * scale).to(torch.float32)
        if self.bias is None:
            return y
        return y + (self.bias.reshape(-1, 1, 1) if self.kind == "conv" else self.bias)

    def _vectors(self, vecs: torch.Tensor) -> torch.Tensor:
        """Outputs ``(V, C_out)`` for input vectors ``(V, K)`` (float32 out, integer path)."""
        c = self.config
        self._program_devices()
        if self.exact_read_noise and c.read_noise > 0:
            per_vector = self.n_tiles * self.n_rows * self.out_channels * 2
        else:
            per_vector = self.n_tiles * len(self._pass_plan()) * (self._columns * self.out_channels + self.n_rows)
        chunk = max(1, self.work_elements // per_vector)
        scale = (self.input_step() * self.weight_step)[None, :]
        outs = [(self._integer_vectors(vecs[s:s + chunk]) * scale).to(torch.float32)
                for s in range(0, vecs.shape[0], chunk)]
        y = torch.cat(outs, dim=0)
        return y if self.bias is None else y + self.bias

    def _passes(self, q: torch.Tensor) -> list[tuple[float, int, torch.Tensor]]:
        """``(sign·2^{o_i}, input slice index, slice levels (V, K))`` for every analog input pass."""
        c = self.config
        if not self.signed_input:
            sources = [(1.0, q)]
        elif c.signed_input_encoding is SignedInputEncoding.SPLIT:
            sources = [(1.0, torch.clamp(q, min=0)), (-1.0, torch.clamp(-q, min=0))]
        else:
            sources = [(1.0, q + 2 ** (c.input_bits - 1))]
        passes = []
        for sign, codes in sources:
            for i, (width, offset) in enumerate(zip(self.in_widths, self.in_offsets)):
                passes.append((sign * 2.0 ** offset, i, bit_slice(codes, offset, width)))
        return passes

    def integer_outputs(self, vecs: torch.Tensor) -> torch.Tensor:
        """The digital result in code units, ``(V, C_out)`` float64, for input vectors ``(V, K)``:
        ``Σ_k q_k·qw_k`` when every conversion is ideal and noiseless. The layer output is
        ``Δx·Δw_c`` times this plus the bias."""
        if not self._integer:
            raise ConfigError(f"layer {self.name}: float inputs or weights have no integer result")
        return self._integer_vectors(vecs)

    def input_step(self) -> float:
        """Input LSB Δx (input units)."""
        return input_step(self.ranges.input_range, self.config.input_bits, self.signed_input)

    def _integer_vectors(self, vecs: torch.Tensor) -> torch.Tensor:
        self._program_devices()
        if self.exact_read_noise and self.config.read_noise > 0:
            return self._integer_vectors_per_device(vecs)
        return self._integer_vectors_batched(vecs)

    def _pass_plan(self) -> list[tuple[float, int]]:
        """``(sign·2^{o_i}, input slice index)`` of every input pass, in :meth:`_passes` order."""
        sources = 2 if self.signed_input and self.config.signed_input_encoding is SignedInputEncoding.SPLIT else 1
        return [(sign * 2.0 ** o, i) for sign in (1.0, -1.0)[:sources] for i, o in enumerate(self.in_offsets)]

    def _build_columns(self) -> None:
        """All ADC channels of all weight slices side by side: ``(tiles, n_rows, columns·C_out)``."""
        cols = [(j, ch) for j, chans in enumerate(self.channels) for ch in chans]
        self._columns = len(cols)
        self._column_slice = [j for j, _ in cols]
        self._column_coef = torch.tensor([ch.sign * 2.0 ** self.w_offsets[j] for j, ch in cols], dtype=torch.float64)
        self._mean_all = torch.cat([ch.mean for _, ch in cols], dim=2)
        has_var = cols[0][1].var is not None
        self._var_all = torch.cat([ch.var for _, ch in cols], dim=2) if has_var else None
        for _, ch in cols:  # the concatenated copies are what the batched path reads
            ch.mean = ch.var = None
        if self.adc_table is not None:
            plan = self._pass_plan()
            steps = np.array([[adc_step(self.adc_table[i, j], self.config.adc_bits, self.config.adc_signed)
                               for j in self._column_slice] for _, i in plan])
            self._adc_steps = torch.tensor(steps, dtype=self.dtype).reshape(1, len(plan), 1, self._columns, 1)

    def _integer_vectors_batched(self, vecs: torch.Tensor) -> torch.Tensor:
        """Every (pass, weight slice, tile, ADC channel) conversion of a chunk in one batched product."""
        c = self.config
        q, _ = input_codes(vecs.to(torch.float64), self.ranges.input_range, c.input_bits, self.signed_input)
        int_dtype = torch.int64 if c.input_bits > 30 else torch.int32
        passes = self._passes(q.to(int_dtype))
        n_pass, n_vec, cols, c_out, tiles = len(passes), q.shape[0], self._columns, self.out_channels, self.n_tiles
        # input slice levels laid out for the batched product: (tiles, passes·vectors, rows), zero-padded rows
        tiled = torch.zeros(tiles, n_pass, n_vec, self.n_rows, dtype=self.dtype, device=vecs.device)
        for p, (_, _, lv) in enumerate(passes):
            if self.n_tiles * self.n_rows != self.fan_in:
                lv = F.pad(lv, (0, tiles * self.n_rows - self.fan_in))
            tiled[:, p] = lv.view(n_vec, tiles, self.n_rows).transpose(0, 1)
        tiled = tiled.view(tiles, n_pass * n_vec, self.n_rows)
        row_sums = torch.stack([lv.sum(dim=1, dtype=torch.float64) for _, _, lv in passes])  # (I, V)
        analog = torch.bmm(tiled, self._mean_all).view(tiles, n_pass, n_vec, cols, c_out)
        var = None
        if self._var_all is not None:
            squares = tiled if max(self.in_widths) == 1 else tiled * tiled
            var = torch.bmm(squares, self._var_all).view(tiles, n_pass, n_vec, cols, c_out)
        step = self._adc_steps if c.adc_bits is not None else None
        thermal = c.adc_thermal_noise_lsb
        if self.partial_sum_observer is not None:  # draw read and thermal noise separately, observe in between
            if var is not None:
                analog = analog + torch.sqrt(var) * torch.randn(analog.shape, dtype=analog.dtype,
                                                                device=analog.device, generator=self._read_gen)
            for p, (_, i, _) in enumerate(passes):
                for col, j in enumerate(self._column_slice):
                    self.partial_sum_observer(self.name, i, j, analog[:, p, :, col, :])
            if thermal > 0:
                sigma = thermal * step if step is not None else thermal
                analog = analog + sigma * torch.randn(analog.shape, dtype=analog.dtype, device=analog.device,
                                                      generator=self._read_gen)
        elif var is not None or thermal > 0:
            # read noise and thermal noise are independent Gaussians: one draw of their summed variance
            if var is None:
                std = thermal * step if step is not None else torch.tensor(float(thermal), dtype=analog.dtype,
                                                                                        device=analog.device)
            else:
                if thermal > 0:
                    var.add_((thermal * step) ** 2 if step is not None else thermal ** 2)
                std = var.sqrt_()
            noise = torch.randn(analog.shape, dtype=analog.dtype, device=analog.device, generator=self._read_gen)
            analog.addcmul_(std, noise)
            del noise, var
        if step is not None:
            lo, hi = adc_code_limits(c.adc_bits, c.adc_signed)
            analog.div_(step).round_().clamp_(lo, hi)  # ADC codes
            # integer codes summed over tiles stay exact in float32 below 2^24, then one step per (pass, column)
            exact32 = analog.dtype == torch.float64 or tiles * hi < EXACT_SUM_LIMIT
            codes = analog.sum(dim=0) if exact32 else analog.sum(dim=0, dtype=torch.float64)
            digital = codes.to(torch.float64) * self._adc_steps[0].to(torch.float64)
        else:
            digital = analog.sum(dim=0, dtype=torch.float64)  # (I, V, columns, C): sum over tiles
        per_pass = (digital * self._column_coef.view(1, 1, cols, 1)).sum(dim=2)  # (I, V, C)
        if c.weight_encoding is WeightEncoding.OFFSET:
            per_pass = per_pass - 2.0 ** (c.weight_bits - 1) * row_sums[:, :, None]
        pass_coef = torch.tensor([coef for coef, _, _ in passes], dtype=torch.float64, device=per_pass.device)
        acc = torch.tensordot(pass_coef, per_pass, dims=1)  # (V, C)
        if self.signed_input and c.signed_input_encoding is SignedInputEncoding.OFFSET:
            acc = acc - 2.0 ** (c.input_bits - 1) * self.qw.sum(dim=1).to(torch.float64)[None, :]
        return acc

    def _integer_vectors_per_device(self, vecs: torch.Tensor) -> torch.Tensor:
        """Exact read-noise mode: one conversion at a time, one read-noise draw per device and read."""
        c = self.config
        q, _ = input_codes(vecs.to(torch.float64), self.ranges.input_range, c.input_bits, self.signed_input)
        q = q.to(self.dtype)
        acc = torch.zeros(vecs.shape[0], self.out_channels, dtype=torch.float64, device=vecs.device)
        pad = self.n_tiles * self.n_rows - self.fan_in
        offset_weights = c.weight_encoding is WeightEncoding.OFFSET
        for pass_coef, i, levels in self._passes(q):
            tiled = (F.pad(levels, (0, pad)) if pad else levels).reshape(-1, self.n_tiles, self.n_rows).transpose(0, 1)
            pass_acc = torch.zeros_like(acc)
            for j, chans in enumerate(self.channels):
                slice_coef = 2.0 ** self.w_offsets[j]
                for ch in chans:
                    analog = self._read_partial_sums(ch, tiled)
                    if self.partial_sum_observer is not None:
                        self.partial_sum_observer(self.name, i, j, analog)
                    digital = adc_convert(analog, c.adc_bits,
                                          None if self.adc_table is None else self.adc_table[i, j],
                                          c.adc_signed, c.adc_thermal_noise_lsb, self._read_gen)
                    pass_acc += (ch.sign * slice_coef) * digital.sum(dim=0, dtype=torch.float64)
            if offset_weights:
                pass_acc -= 2.0 ** (c.weight_bits - 1) * levels.sum(dim=1, dtype=torch.float64)[:, None]
            acc += pass_coef * pass_acc
        if self.signed_input and c.signed_input_encoding is SignedInputEncoding.OFFSET:
            acc -= 2.0 ** (c.input_bits - 1) * self.qw.sum(dim=1).to(torch.float64)[None, :]
        return acc

    def _read_partial_sums(self, ch: _AdcChannel, tiled: torch.Tensor) -> torch.Tensor:
        """Analog partial sums ``(tiles, V, C_out)`` of one ADC channel for one input pass, with one
        read-noise draw per device and input vector: ``Σ_k x_k·max(0, h_k + σ_k·z)``."""
        total = None
        for sign, h, sigma in ch.programmed:
            noise = torch.randn((tiled.shape[1],) + tuple(h.shape), dtype=self.dtype, device=h.device,
                                generator=self._read_gen)
            cond = torch.clamp(h.unsqueeze(0) + sigma.unsqueeze(0) * noise, min=0.0)  # (V, T, n, C)
            part = torch.einsum("tvn,vtnc->tvc", tiled, cond)
            total = sign * part if total is None else total + sign * part
        return total
