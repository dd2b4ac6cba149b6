// Paged attention on the CPU, reading the KV pool in place through the block tables.
//
// Built and loaded by pageant/kernels/cpu_attention.py (ops pageant_cpu::paged_decode and
// pageant_cpu::paged_prefill). Caches: [num_blocks, block_size, num_kv_heads, head_dim] in float32,
// bfloat16, float16 or float8_e4m3fn (times k_scale / v_scale); queries and outputs
// [tokens, num_heads, head_dim] in float32, bfloat16 or float16. Math in float32.
//
// Work item: some KV heads of one sequence and some of its query positions (decode: one position;
// every KV head when there are enough sequences for the threads, so each page is walked once). Its
// rows are the `group = num_heads / num_kv_heads` query heads of each KV head at each position; key
// positions are walked in tiles of kTile through the block table (never past the last query's
// position, so padding entries are never read) with an online softmax in float32, blocks of rows
// sharing every K/V load (cpu_attention_simd.h). Visibility per position p: keys k with
// lo <= k <= p, lo = max(0, p - sliding_window + 1) (pageant.kernels.attention_masks). Scores:
// (q * scale) . k, then cap * tanh(s / cap) if capped.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <atomic>
#include <vector>

#include "cpu_attention_simd.h"

namespace {

using namespace pageant_cpu;

struct Problem {
  int64_t num_heads, num_kv_heads, group, head_dim, block_size, num_blocks;
  const void* k;
  const void* v;
  int64_t k_stride[3], v_stride[3];  // block, slot, head (elements); head_dim is contiguous
  const int32_t* tables;
  int64_t table_stride[2], table_width;
  const void* q;
  void* out;
  at::ScalarType q_dtype;
  int64_t q_stride[2], out_stride[2], out_elem;  // token, head; bytes per output element
  float scale, soft_cap;  // soft_cap 0: none
  int64_t sliding_window;  // 0: none
  float k_lut[256], v_lut[256];  // FP8: dequantised values of every byte
};

// Per-thread buffers for items of up to `max_rows` rows, `max_heads` KV heads, `max_positions` positions.
struct Scratch {
  std::vector<float> q, acc, s, m, l, kbuf, vbuf;
  std::vector<const float*> krow, vrow;
  std::vector<int64_t> lo, hi;  // per position of the item: visible keys lo ..= hi
  Scratch(int64_t max_rows, int64_t max_heads, int64_t max_positions, int64_t d)
      : q(max_rows * d), acc(max_rows * d), s(max_rows * kTile), m(max_rows), l(max_rows), kbuf(max_heads * kTile * d),
        vbuf(max_heads * kTile * d), krow(max_heads * kTile), vrow(max_heads * kTile), lo(max_positions),
        hi(max_positions) {}
};

int64_t block_id(const Problem& pb, const int32_t* table, int64_t logical) {
  const int64_t id = table[logical * pb.table_stride[1]];
  TORCH_CHECK_INDEX(id >= 0 && id < pb.num_blocks, "block_tables entry ", id, " is out of range for a cache of ",
                    pb.num_blocks, " blocks");
  return id;
}

// Rows of key/value positions pos0 .. pos0 + n - 1 of KV heads kv_head .. kv_head + num_heads - 1 of the
// sequence whose block table is `table`: rows[hh * kTile + t] (converted into buf unless float32).
template <typename C>
void gather(const Problem& pb, const C* base, const int64_t* stride, const float* lut, const int32_t* table,
            int64_t kv_head, int64_t num_heads, int64_t pos0, int64_t n, float* buf, const float** rows) {
  const int64_t d = pb.head_dim;
  int64_t logical = pos0 / pb.block_size, off = pos0 % pb.block_size;
  int64_t blk = block_id(pb, table, logical);
  for (int64_t t = 0; t < n; ++t) {
    const C* p = base + blk * stride[0] + off * stride[1] + kv_head * stride[2];
    for (int64_t hh = 0; hh < num_heads; ++hh) {
      if constexpr (std::is_same_v<C, float>) {
        rows[hh * kTile + t] = p + hh * stride[2];
      } else {
        float* row = buf + (hh * kTile + t) * d;
        to_float(p + hh * stride[2], row, d, lut);
        rows[hh * kTile + t] = row;
      }
    }
    if (++off == pb.block_size && t + 1 < n) {
      off = 0;
      blk = block_id(pb, table, ++logical);
    }
  }
}

// The online softmax step of one row over its visible scores s[a .. b - 1]: cap them, update the
// running max m and sum l, rescale the accumulator, and leave the weights exp(s - m) in s. A full
// tile (kFull: a = 0, b = kTile) has constant bounds: its loops compile to a few whole vectors.
template <bool kFull>
inline void softmax_step(const Problem& pb, float* s, int64_t a, int64_t b, float& m, float& l, float* acc,
                         int64_t d) {
  if constexpr (kFull) a = 0, b = kTile;
  if (pb.soft_cap > 0.0f) {
    const float cap = pb.soft_cap, inv = 1.0f / pb.soft_cap;
#pragma omp simd
    for (int64_t t = a; t < b; ++t) s[t] = cap * fast_tanh(s[t] * inv);
  }
  const float m_new = std::max(m, row_max(s, a, b));
  const float alpha = m_new == m ? 1.0f : fast_exp(m - m_new);  // the max often stays
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t t = a; t < b; ++t) {
    s[t] = fast_exp(s[t] - m_new);
    sum += s[t];
  }
  m = m_new;
  l = l * alpha + sum;
  if (alpha != 1.0f) {
#pragma omp simd
    for (int64_t c = 0; c < d; ++c) acc[c] *= alpha;
  }
}

inline void update_row(const Problem& pb, float* s, int64_t a, int64_t b, float& m, float& l, float* acc, int64_t d) {
  a == 0 && b == kTile ? softmax_step<true>(pb, s, a, b, m, l, acc, d) : softmax_step<false>(pb, s, a, b, m, l, acc, d);
}

// One item: positions first_pos .. first_pos + num_pos - 1 of sequence `seq`, KV heads kv_head ..
// kv_head + num_heads - 1; their query/output rows are tokens first_token .. first_token + num_pos - 1.
// Row (hh * num_pos + j) * group + h: query head (kv_head + hh) * group + h at position j.
template <typename C>
void attend(const Problem& pb, int64_t seq, int64_t kv_head, int64_t num_heads, int64_t first_token,
            int64_t first_pos, int64_t num_pos, Scratch& w) {
  const int64_t d = pb.head_dim, g = pb.group, rows = num_heads * num_pos * g;
  const int32_t* table = pb.tables + seq * pb.table_stride[0];
  for (int64_t j = 0; j < num_pos; ++j) {
    const int64_t p = first_pos + j;
    w.hi[j] = p;
    w.lo[j] = pb.sliding_window > 0 ? std::max<int64_t>(0, p - pb.sliding_window + 1) : 0;
  }
  for (int64_t hh = 0; hh < num_heads; ++hh)
    for (int64_t j = 0; j < num_pos; ++j)
      for (int64_t h = 0; h < g; ++h) {
        const int64_t head = (kv_head + hh) * g + h, r = (hh * num_pos + j) * g + h;
        load_row(pb.q, pb.q_dtype, (first_token + j) * pb.q_stride[0] + head * pb.q_stride[1], pb.scale, d,
                 w.q.data() + r * d);
      }
  std::fill(w.acc.begin(), w.acc.begin() + rows * d, 0.0f);
  std::fill(w.m.begin(), w.m.begin() + rows, kNegInf);
  std::fill(w.l.begin(), w.l.begin() + rows, 0.0f);
  const int64_t key_end = first_pos + num_pos;  // exclusive
  for (int64_t pos0 = w.lo[0]; pos0 < key_end; pos0 += kTile) {
    const int64_t n = std::min(kTile, key_end - pos0);
    gather<C>(pb, static_cast<const C*>(pb.k), pb.k_stride, pb.k_lut, table, kv_head, num_heads, pos0, n,
              w.kbuf.data(), w.krow.data());
    gather<C>(pb, static_cast<const C*>(pb.v), pb.v_stride, pb.v_lut, table, kv_head, num_heads, pos0, n,
              w.vbuf.data(), w.vrow.data());
    for (int64_t hh = 0; hh < num_heads; ++hh) {
      const float* const* krow = w.krow.data() + hh * kTile;
      const float* const* vrow = w.vrow.data() + hh * kTile;
      // blocks of kRowBlock consecutive rows (across positions too) share each K/V load: scores
      // over the union of their visible keys, each row's softmax over its own, 0 elsewhere
      const int64_t first = hh * num_pos * g, last = first + num_pos * g;
      for (int64_t r = first; r < last; r += kRowBlock) {
        const int block = static_cast<int>(std::min<int64_t>(kRowBlock, last - r));
        int64_t a[kRowBlock], b[kRowBlock], lo = kTile, hi = 0;
        for (int i = 0; i < block; ++i) {
          const int64_t j = (r + i - first) / g;
          a[i] = std::max<int64_t>(w.lo[j] - pos0, 0);
          b[i] = std::min<int64_t>(w.hi[j] - pos0 + 1, n);
          if (a[i] < b[i]) lo = std::min(lo, a[i]), hi = std::max(hi, b[i]);
        }
        if (lo >= hi) continue;  // no row of the block sees a key of this tile
        scores(w.q.data() + r * d, block, krow, lo, hi, d, w.s.data() + r * kTile);
        for (int i = 0; i < block; ++i) {
          float* s = w.s.data() + (r + i) * kTile;
          if (a[i] >= b[i]) {
            std::fill(s + lo, s + hi, 0.0f);
            continue;
          }
          update_row(pb, s, a[i], b[i], w.m[r + i], w.l[r + i], w.acc.data() + (r + i) * d, d);
          std::fill(s + lo, s + a[i], 0.0f);
          std::fill(s + b[i], s + hi, 0.0f);
        }
        accumulate(w.acc.data() + r * d, block, w.s.data() + r * kTile, vrow, lo, hi, d);
      }
    }
  }
  for (int64_t hh = 0; hh < num_heads; ++hh)
    for (int64_t j = 0; j < num_pos; ++j)
      for (int64_t h = 0; h < g; ++h) {
        const int64_t r = (hh * num_pos + j) * g + h, head = (kv_head + hh) * g + h;
        store_row(pb.out, pb.q_dtype, (first_token + j) * pb.out_stride[0] + head * pb.out_stride[1],
                  w.acc.data() + r * d, 1.0f / w.l[r], d);
      }
}

// Items 0 .. num_items - 1 taken dynamically (mixed lengths) by torch's intra-op threads.
template <typename F>
void run_items(int64_t num_items, int64_t max_rows, int64_t max_heads, int64_t max_positions, int64_t head_dim,
               const F& item) {
  std::atomic<int64_t> next{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), num_items));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    Scratch w(max_rows, max_heads, max_positions, head_dim);
    for (int64_t i = next.fetch_add(1); i < num_items; i = next.fetch_add(1)) item(i, w);
  });
}

Problem make_problem(const at::Tensor& out, const at::Tensor& query, const at::Tensor& k_cache,
                     const at::Tensor& v_cache, const at::Tensor& block_tables, double scale, int64_t sliding_window,
                     double soft_cap, double k_scale, double v_scale) {
  TORCH_CHECK_VALUE(query.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
                    "query must be [tokens, heads, head_dim] and the caches [blocks, block_size, kv_heads, head_dim]");
  TORCH_CHECK_VALUE(query.stride(2) == 1 && out.stride(2) == 1 && k_cache.stride(3) == 1 && v_cache.stride(3) == 1,
                    "head_dim must be contiguous");
  TORCH_CHECK_VALUE(out.sizes() == query.sizes() && out.scalar_type() == query.scalar_type(),
                    "out must match the query's shape and dtype");
  TORCH_CHECK_VALUE(block_tables.dim() == 2 && block_tables.scalar_type() == at::kInt,
                    "block_tables must be int32 2-D");
  Problem pb;
  pb.num_heads = query.size(1);
  pb.num_blocks = k_cache.size(0);
  pb.block_size = k_cache.size(1);
  pb.num_kv_heads = k_cache.size(2);
  pb.head_dim = k_cache.size(3);
  TORCH_CHECK_VALUE(query.size(2) == pb.head_dim && pb.num_heads % pb.num_kv_heads == 0,
                    "query heads must be a multiple of the KV heads, with the same head_dim");
  pb.group = pb.num_heads / pb.num_kv_heads;
  pb.k = k_cache.data_ptr();
  pb.v = v_cache.data_ptr();
  for (int i = 0; i < 3; ++i) {
    pb.k_stride[i] = k_cache.stride(i);
    pb.v_stride[i] = v_cache.stride(i);
  }
  pb.tables = block_tables.data_ptr<int32_t>();
  pb.table_stride[0] = block_tables.stride(0);
  pb.table_stride[1] = block_tables.stride(1);
  pb.table_width = block_tables.size(1);
  pb.q = query.data_ptr();
  pb.out = out.data_ptr();
  pb.q_dtype = query.scalar_type();
  pb.out_elem = out.element_size();
  TORCH_CHECK_VALUE(pb.q_dtype == at::kFloat || pb.q_dtype == at::kBFloat16 || pb.q_dtype == at::kHalf,
                    "query must be float32, bfloat16 or float16");
  for (int i = 0; i < 2; ++i) {
    pb.q_stride[i] = query.stride(i);
    pb.out_stride[i] = out.stride(i);
  }
  pb.scale = static_cast<float>(scale);
  pb.soft_cap = static_cast<float>(soft_cap);
  pb.sliding_window = sliding_window;
  const float ks = static_cast<float>(k_scale), vs = static_cast<float>(v_scale);
  for (int b = 0; b < 256; ++b) {
    const float x = static_cast<float>(c10::Float8_e4m3fn(static_cast<uint8_t>(b), c10::Float8_e4m3fn::from_bits()));
    pb.k_lut[b] = x * ks;
    pb.v_lut[b] = x * vs;
  }
  return pb;
}

template <typename F>
void dispatch_cache(at::ScalarType dtype, const F& f) {
  switch (dtype) {
    case at::kFloat: return f(float{});
    case at::kBFloat16: return f(c10::BFloat16{});
    case at::kHalf: return f(c10::Half{});
    case at::kFloat8_e4m3fn: return f(c10::Float8_e4m3fn{});
    default: TORCH_CHECK_VALUE(false, "KV cache dtype ", dtype, " is not supported");
  }
}

// Sequence `seq`'s context of `seq_len` tokens, checked against the width of its block table.
void check_context(const Problem& pb, int64_t seq_len, int64_t seq) {
  TORCH_CHECK_VALUE((seq_len + pb.block_size - 1) / pb.block_size <= pb.table_width, "sequence ", seq, " has ",
                    seq_len, " tokens but its block table only ", pb.table_width, " blocks of ", pb.block_size);
}

void paged_decode(at::Tensor out, const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
                  const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale, int64_t sliding_window,
                  double soft_cap, double k_scale, double v_scale) {
  const Problem pb = make_problem(out, query, k_cache, v_cache, block_tables, scale, sliding_window, soft_cap,
                                  k_scale, v_scale);
  const int64_t num_seqs = query.size(0);
  TORCH_CHECK_VALUE(seq_lens.dim() == 1 && seq_lens.size(0) == num_seqs && seq_lens.scalar_type() == at::kInt &&
                        seq_lens.is_contiguous() && block_tables.size(0) >= num_seqs,
                    "seq_lens must be int32 [num_seqs] and block_tables [>= num_seqs, width]");
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  for (int64_t i = 0; i < num_seqs; ++i) check_context(pb, lens[i], i);
  // an item takes every KV head of its sequence (one pass over each page) when there are enough
  // sequences to keep the threads busy, else one KV head
  const int64_t threads = at::get_num_threads();
  const int64_t heads = threads == 1 || num_seqs >= 4 * threads ? pb.num_kv_heads : 1;
  const int64_t chunks = pb.num_kv_heads / heads;
  dispatch_cache(k_cache.scalar_type(), [&](auto tag) {
    using C = decltype(tag);
    run_items(num_seqs * chunks, heads * pb.group, heads, 1, pb.head_dim, [&](int64_t i, Scratch& w) {
      const int64_t seq = i / chunks, kv_head = (i % chunks) * heads, n = lens[seq];
      if (n > 0) {
        attend<C>(pb, seq, kv_head, heads, seq, n - 1, 1, w);
        return;
      }
      for (int64_t h = kv_head * pb.group; h < (kv_head + heads) * pb.group; ++h) {  // no context: zeros
        const int64_t offset = seq * pb.out_stride[0] + h * pb.out_stride[1];     // (as Triton's padding rows)
        std::memset(static_cast<char*>(pb.out) + offset * pb.out_elem, 0, pb.head_dim * pb.out_elem);
      }
    });
  });
}

void paged_prefill(at::Tensor out, const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
                   const at::Tensor& block_tables, const at::Tensor& query_start_loc, const at::Tensor& seq_lens,
                   double scale, int64_t sliding_window, double soft_cap, double k_scale, double v_scale,
                   int64_t rows_per_item) {
  const Problem pb = make_problem(out, query, k_cache, v_cache, block_tables, scale, sliding_window, soft_cap,
                                  k_scale, v_scale);
  const int64_t num_seqs = seq_lens.size(0);
  TORCH_CHECK_VALUE(seq_lens.dim() == 1 && seq_lens.scalar_type() == at::kInt && seq_lens.is_contiguous() &&
                        query_start_loc.dim() == 1 && query_start_loc.size(0) == num_seqs + 1 &&
                        query_start_loc.scalar_type() == at::kInt && query_start_loc.is_contiguous() &&
                        block_tables.size(0) >= num_seqs,
                    "seq_lens must be int32 [num_seqs], query_start_loc int32 [num_seqs + 1]");
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int32_t* starts = query_start_loc.data_ptr<int32_t>();
  const int64_t per_item = std::max<int64_t>(1, rows_per_item / pb.group);  // positions per item
  std::vector<int64_t> item_seq, item_first;  // items: (sequence, first query of the item)
  for (int64_t i = 0; i < num_seqs; ++i) {
    const int64_t q_len = starts[i + 1] - starts[i];
    TORCH_CHECK_VALUE(starts[0] >= 0 && q_len >= 0 && starts[i + 1] <= query.size(0),
                      "query_start_loc must be non-decreasing within 0 ..= ", query.size(0), " (the query tokens)");
    TORCH_CHECK_VALUE(q_len <= lens[i], "sequence ", i, " has ", q_len, " query tokens but seq_len ", lens[i]);
    check_context(pb, lens[i], i);
    for (int64_t j = 0; j < q_len; j += per_item) {
      item_seq.push_back(i);
      item_first.push_back(j);
    }
  }
  const int64_t num_items = static_cast<int64_t>(item_seq.size()) * pb.num_kv_heads;
  dispatch_cache(k_cache.scalar_type(), [&](auto tag) {
    using C = decltype(tag);
    run_items(num_items, per_item * pb.group, 1, per_item, pb.head_dim, [&](int64_t i, Scratch& w) {
      const int64_t it = i / pb.num_kv_heads, kv_head = i % pb.num_kv_heads, seq = item_seq[it];
      const int64_t q_len = starts[seq + 1] - starts[seq], j0 = item_first[it];
      const int64_t num_pos = std::min(per_item, q_len - j0);
      attend<C>(pb, seq, kv_head, 1, starts[seq] + j0, lens[seq] - q_len + j0, num_pos, w);
    });
  });
}

}  // namespace

TORCH_LIBRARY(pageant_cpu, m) {
  m.def("paged_decode(Tensor(a!) out, Tensor query, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor seq_lens, float scale, int sliding_window, float soft_cap, float k_scale, float v_scale) -> ()");
  m.def("paged_prefill(Tensor(a!) out, Tensor query, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor query_start_loc, Tensor seq_lens, float scale, int sliding_window, float soft_cap, float k_scale, "
        "float v_scale, int rows_per_item) -> ()");
}

TORCH_LIBRARY_IMPL(pageant_cpu, CPU, m) {
  m.impl("paged_decode", paged_decode);
  m.impl("paged_prefill", paged_prefill);
}
