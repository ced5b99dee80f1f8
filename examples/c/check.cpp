// Runs dense attention, a paged decode step, a paged append followed by the same decode, and
// an LSE merge through the C API on the CPU and compares them with the f64 reference values
// the Rust side wrote (`cargo run --example c_fixture -- FILE`); a neighborhood, a
// block-sparse and a MoBA call against the dense entry on problems where they equal it; then
// checks that bad arguments come back as status codes with a message. Exit code 0 only if all
// hold.
//
// Fixture (little-endian):
// dense: 8 u64 [batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, window_left + 1,
//        causal], then f32 q, k, v (contiguous) and the f64 reference output;
// paged: 8 u64 [num_pages, page_size, heads_kv, head_dim, batch, max_pages_per_seq, heads_q,
//        q_len], i32 block_table, i32 seqlens_k, f32 q, k_cache, v_cache, f64 reference;
// merge: 4 u64 [batch, seqlen, heads, head_dim], f32 o_a, lse_a, o_b, lse_b (attention over
//        two disjoint key sets), f64 o, lse (over their union).
#include <longattn.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <utility>
#include <vector>

static double rel_l2(const std::vector<float> &got, const std::vector<double> &want) {
  double num = 0, den = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (std::isnan(got[i])) return INFINITY;
    num += (got[i] - want[i]) * (got[i] - want[i]);
    den += want[i] * want[i];
  }
  return std::sqrt(num / den);
}

template <typename T> static bool read_vec(std::ifstream &f, std::vector<T> &v, size_t n) {
  v.resize(n);
  return bool(f.read(reinterpret_cast<char *>(v.data()), std::streamsize(n * sizeof(T))));
}

static double rel_l2(const std::vector<float> &got, const std::vector<float> &want) {
  return rel_l2(got, std::vector<double>(want.begin(), want.end()));
}

// Deterministic values in [-1, 1).
static std::vector<float> values(size_t n, uint32_t seed) {
  std::vector<float> v(n);
  for (auto &x : v) {
    seed = seed * 1664525u + 1013904223u;
    x = float(seed >> 8) / float(1u << 23) - 1.0f;
  }
  return v;
}

// Dense attention through the C API (f32, contiguous); empty on failure.
static std::vector<float> dense(const longattn_dense_desc &desc, const std::vector<float> &q,
                                const std::vector<float> &k, const std::vector<float> &v) {
  const longattn_strides qs = {int64_t(desc.seqlen_q * desc.heads_q * desc.head_dim),
                               int64_t(desc.heads_q * desc.head_dim), int64_t(desc.head_dim)};
  const longattn_strides ks = {int64_t(desc.seqlen_k * desc.heads_kv * desc.head_dim),
                               int64_t(desc.heads_kv * desc.head_dim), int64_t(desc.head_dim)};
  std::vector<float> out(q.size(), NAN);
  if (longattn_dense_forward_cpu(&desc, LONGATTN_F32, {q.data(), q.size(), qs},
                                 {k.data(), k.size(), ks}, {v.data(), v.size(), ks},
                                 {out.data(), out.size(), qs}, nullptr, 0) != LONGATTN_OK) {
    std::fprintf(stderr, "dense: %s\n", longattn_last_error());
    return {};
  }
  return out;
}

// A 2-D neighborhood whose kernels span the grid is dense attention over the flattened grid;
// a block mask listing every block as partial, or MoBA keeping every block, with causal set,
// is dense causal attention.
static bool check_neighborhood_and_block_sparse() {
  const size_t hq = 2, hkv = 1, d = 8, x = 3, y = 5, n = x * y;
  longattn_neighborhood_desc na = {};
  na.batch = 1;
  na.heads_q = hq;
  na.heads_kv = hkv;
  na.head_dim = d;
  na.rank = 2;
  na.dims[0].length = x;
  na.dims[0].kernel = x;
  na.dims[1].length = y;
  na.dims[1].kernel = y;
  size_t out_len = 0, lse_len = 0;
  if (longattn_neighborhood_sizes(&na, &out_len, &lse_len) != LONGATTN_OK) {
    std::fprintf(stderr, "neighborhood sizes: %s\n", longattn_last_error());
    return false;
  }
  const std::vector<float> q = values(out_len, 1), k = values(n * hkv * d, 2),
                           v = values(n * hkv * d, 3);
  const longattn_strides qs = {int64_t(n * hq * d), int64_t(hq * d), int64_t(d)};
  const longattn_strides ks = {int64_t(n * hkv * d), int64_t(hkv * d), int64_t(d)};
  std::vector<float> out(out_len, NAN), lse(lse_len, NAN);
  longattn_status st = longattn_neighborhood_forward_cpu(
      &na, LONGATTN_F32, {q.data(), q.size(), qs}, {k.data(), k.size(), ks},
      {v.data(), v.size(), ks}, {out.data(), out.size(), qs}, lse.data(), lse.size());
  if (st != LONGATTN_OK) {
    std::fprintf(stderr, "neighborhood: status %d: %s\n", int(st), longattn_last_error());
    return false;
  }
  longattn_dense_desc dd = {};
  dd.batch = 1;
  dd.heads_q = hq;
  dd.heads_kv = hkv;
  dd.head_dim = d;
  dd.seqlen_q = n;
  dd.seqlen_k = n;
  dd.window_left = -1;
  dd.window_right = -1;
  const std::vector<float> want = dense(dd, q, k, v);
  const double nerr = want.empty() ? INFINITY : rel_l2(out, want);
  std::printf("neighborhood cpu: %zu x %zu grid, full kernels, rel L2 vs the dense entry %.3e\n",
              x, y, nerr);
  na.dims[1].kernel = y + 1;
  st = longattn_neighborhood_sizes(&na, &out_len, &lse_len);
  std::printf("kernel > length: status %d (%s)\n", int(st), longattn_last_error());
  bool ok = nerr < 1e-5 && st == LONGATTN_ERR_INVALID_OPTION;

  // Block-sparse: 29 queries, 41 keys, 8 x 8 blocks, every block listed (partial), causal.
  const size_t sq = 29, sk = 41, blk = 8, nqb = (sq + blk - 1) / blk, nkb = (sk + blk - 1) / blk;
  std::vector<int32_t> offsets(1, 0), indices;
  for (size_t qb = 0; qb < nqb; ++qb) {
    for (size_t kb = 0; kb < nkb; ++kb) indices.push_back(int32_t(kb));
    offsets.push_back(int32_t(indices.size()));
  }
  longattn_block_mask mask = {1, 1, nqb, nkb, blk, blk, offsets.data(), indices.data(),
                              nullptr, indices.size()};
  dd.seqlen_q = sq;
  dd.seqlen_k = sk;
  dd.causal = 1;
  const std::vector<float> bq = values(sq * hq * d, 4), bk = values(sk * hkv * d, 5),
                           bv = values(sk * hkv * d, 6);
  const longattn_strides bqs = {int64_t(sq * hq * d), int64_t(hq * d), int64_t(d)};
  const longattn_strides bks = {int64_t(sk * hkv * d), int64_t(hkv * d), int64_t(d)};
  std::vector<float> bout(bq.size(), NAN);
  st = longattn_block_sparse_forward_cpu(&dd, &mask, LONGATTN_F32, {bq.data(), bq.size(), bqs},
                                         {bk.data(), bk.size(), bks}, {bv.data(), bv.size(), bks},
                                         {bout.data(), bout.size(), bqs}, nullptr, 0);
  if (st != LONGATTN_OK) {
    std::fprintf(stderr, "block-sparse: status %d: %s\n", int(st), longattn_last_error());
    return false;
  }
  const std::vector<float> bwant = dense(dd, bq, bk, bv);
  const double berr = bwant.empty() ? INFINITY : rel_l2(bout, bwant);
  std::printf("block-sparse cpu: %zu x %zu, %zu x %zu blocks all partial + causal, rel L2 vs "
              "the dense causal entry %.3e\n",
              sq, sk, nqb, nkb, berr);
  std::swap(indices[1], indices[2]);
  st = longattn_block_sparse_forward_cpu(&dd, &mask, LONGATTN_F32, {bq.data(), bq.size(), bqs},
                                         {bk.data(), bk.size(), bks}, {bv.data(), bv.size(), bks},
                                         {bout.data(), bout.size(), bqs}, nullptr, 0);
  std::printf("unsorted block list: status %d (%s)\n", int(st), longattn_last_error());
  ok = ok && berr < 1e-5 && st == LONGATTN_ERR_INDEX;

  // MoBA with top_k above the block count: every row sees its own and all earlier blocks,
  // which with causal set is dense causal attention.
  const longattn_moba_config all_blocks = {blk, 100};
  std::vector<float> mout(bq.size(), NAN);
  st = longattn_moba_forward_cpu(&dd, all_blocks, LONGATTN_F32, {bq.data(), bq.size(), bqs},
                                 {bk.data(), bk.size(), bks}, {bv.data(), bv.size(), bks},
                                 {mout.data(), mout.size(), bqs}, nullptr, 0);
  if (st != LONGATTN_OK) {
    std::fprintf(stderr, "moba: status %d: %s\n", int(st), longattn_last_error());
    return false;
  }
  const double merr = bwant.empty() ? INFINITY : rel_l2(mout, bwant);
  std::printf("moba cpu: block %zu, top_k 100 (all blocks) + causal, rel L2 vs the dense causal "
              "entry %.3e\n",
              blk, merr);
  return ok && merr < 1e-5;
}

int main(int argc, char **argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s FIXTURE\n", argv[0]);
    return 2;
  }
  std::printf("longattn %s (header %s)\n", longattn_version(), LONGATTN_VERSION_STRING);
  std::ifstream f(argv[1], std::ios::binary);
  std::vector<uint64_t> dims;
  if (!read_vec(f, dims, 8)) {
    std::fprintf(stderr, "cannot read %s\n", argv[1]);
    return 2;
  }
  const size_t b = dims[0], sq = dims[1], sk = dims[2], hq = dims[3], hkv = dims[4], d = dims[5];
  std::vector<float> q, k, v;
  std::vector<double> want;
  if (!read_vec(f, q, b * sq * hq * d) || !read_vec(f, k, b * sk * hkv * d) ||
      !read_vec(f, v, b * sk * hkv * d) || !read_vec(f, want, b * sq * hq * d)) {
    std::fprintf(stderr, "short fixture\n");
    return 2;
  }

  longattn_dense_desc desc = {};
  desc.batch = b;
  desc.heads_q = hq;
  desc.heads_kv = hkv;
  desc.head_dim = d;
  desc.seqlen_q = sq;
  desc.seqlen_k = sk;
  desc.window_left = int64_t(dims[6]) - 1;
  desc.window_right = -1;
  desc.causal = int32_t(dims[7]);
  size_t out_len = 0, lse_len = 0;
  if (longattn_dense_sizes(&desc, &out_len, &lse_len) != LONGATTN_OK) {
    std::fprintf(stderr, "sizes: %s\n", longattn_last_error());
    return 1;
  }
  std::vector<float> out(out_len, NAN), lse(lse_len, NAN);
  const longattn_strides qs = {int64_t(sq * hq * d), int64_t(hq * d), int64_t(d)};
  const longattn_strides ks = {int64_t(sk * hkv * d), int64_t(hkv * d), int64_t(d)};
  longattn_status st = longattn_dense_forward_cpu(
      &desc, LONGATTN_F32, {q.data(), q.size(), qs}, {k.data(), k.size(), ks},
      {v.data(), v.size(), ks}, {out.data(), out.size(), qs}, lse.data(), lse.size());
  if (st != LONGATTN_OK) {
    std::fprintf(stderr, "forward: status %d: %s\n", int(st), longattn_last_error());
    return 1;
  }
  const double err = rel_l2(out, want);
  std::printf("dense cpu: %zu x %zu x %zu heads, rel L2 vs the Rust f64 reference %.3e\n", b, sq,
              hq, err);

  longattn_dense_desc bad = desc;
  bad.heads_kv = 0;
  st = longattn_dense_sizes(&bad, &out_len, &lse_len);
  std::printf("heads_kv = 0: status %d (%s)\n", int(st), longattn_last_error());
  bool ok = err < 1e-5 && st == LONGATTN_ERR_SHAPE;

  // Paged decode.
  std::vector<uint64_t> pd;
  if (!read_vec(f, pd, 8)) {
    std::fprintf(stderr, "short fixture (paged)\n");
    return 2;
  }
  longattn_paged_desc paged = {};
  paged.num_pages = pd[0];
  paged.page_size = pd[1];
  paged.heads_kv = pd[2];
  paged.head_dim = pd[3];
  paged.batch = pd[4];
  paged.max_pages_per_seq = pd[5];
  paged.heads_q = pd[6];
  paged.q_len = pd[7];
  paged.window_left = -1;
  paged.window_right = -1;
  std::vector<int32_t> table, seqlens;
  std::vector<float> pq, kc, vc;
  std::vector<double> pwant;
  const size_t cache = pd[0] * pd[1] * pd[2] * pd[3], rows = pd[4] * pd[7] * pd[6] * pd[3];
  if (!read_vec(f, table, pd[4] * pd[5]) || !read_vec(f, seqlens, pd[4]) ||
      !read_vec(f, pq, rows) || !read_vec(f, kc, cache) || !read_vec(f, vc, cache) ||
      !read_vec(f, pwant, rows)) {
    std::fprintf(stderr, "short fixture (paged)\n");
    return 2;
  }
  paged.block_table = table.data();
  paged.seqlens_k = seqlens.data();
  size_t cache_len = 0, pout_len = 0, plse_len = 0;
  if (longattn_paged_sizes(&paged, &cache_len, &pout_len, &plse_len) != LONGATTN_OK ||
      cache_len != cache) {
    std::fprintf(stderr, "paged sizes: %s\n", longattn_last_error());
    return 1;
  }
  std::vector<float> pout(pout_len, NAN);
  const longattn_strides ps = {int64_t(pd[7] * pd[6] * pd[3]), int64_t(pd[6] * pd[3]),
                               int64_t(pd[3])};
  st = longattn_paged_decode_cpu(&paged, LONGATTN_F32, {pq.data(), pq.size(), ps}, kc.data(),
                                 vc.data(), cache_len, {pout.data(), pout.size(), ps}, nullptr, 0);
  if (st != LONGATTN_OK) {
    std::fprintf(stderr, "paged decode: status %d: %s\n", int(st), longattn_last_error());
    return 1;
  }
  const double perr = rel_l2(pout, pwant);
  std::printf("paged decode cpu: %zu sequences, page %zu, q_len %zu, rel L2 vs the Rust f64 "
              "reference %.3e\n",
              size_t(pd[4]), size_t(pd[1]), size_t(pd[7]), perr);
  ok = ok && perr < 1e-5;

  // Paged append: each sequence's tokens gathered from the fixture's cache through the block
  // table, appended into a fresh cache (with the Quest page bounds), then the same decode.
  const size_t page = pd[1], hd = pd[3], row = pd[2] * hd;
  std::vector<int32_t> cu(pd[4] + 1, 0);
  std::vector<float> kn, vn;
  for (size_t s = 0; s < pd[4]; ++s) {
    for (size_t t = 0; t < size_t(seqlens[s]); ++t) {
      const size_t off = (size_t(table[s * pd[5] + t / page]) * page + t % page) * row;
      kn.insert(kn.end(), kc.begin() + off, kc.begin() + off + row);
      vn.insert(vn.end(), vc.begin() + off, vc.begin() + off + row);
    }
    cu[s + 1] = cu[s] + seqlens[s];
  }
  size_t meta_len = 0;
  if (longattn_paged_cache_sizes(&paged, nullptr, &meta_len) != LONGATTN_OK) {
    std::fprintf(stderr, "paged cache sizes: %s\n", longattn_last_error());
    return 1;
  }
  std::vector<float> kc2(cache_len, 0.f), vc2(cache_len, 0.f), kmin(meta_len), kmax(meta_len);
  const longattn_strides ns = {int64_t(kn.size()), int64_t(row), int64_t(hd)};
  const longattn_paged_kv_mut kv = {kc2.data(), vc2.data(), cache_len,
                                    kmin.data(), kmax.data(), meta_len};
  st = longattn_paged_append_cpu(&paged, cu.data(), LONGATTN_F32, {kn.data(), kn.size(), ns},
                                 {vn.data(), vn.size(), ns}, kv);
  if (st != LONGATTN_OK) {
    std::fprintf(stderr, "paged append: status %d: %s\n", int(st), longattn_last_error());
    return 1;
  }
  std::vector<float> aout(pout_len, NAN);
  st = longattn_paged_decode_cpu(&paged, LONGATTN_F32, {pq.data(), pq.size(), ps}, kc2.data(),
                                 vc2.data(), cache_len, {aout.data(), aout.size(), ps}, nullptr, 0);
  if (st != LONGATTN_OK) {
    std::fprintf(stderr, "decode after append: status %d: %s\n", int(st), longattn_last_error());
    return 1;
  }
  const double aerr = rel_l2(aout, pwant);
  // Every appended key lies within its page's bounds.
  bool bounded = true;
  for (size_t s = 0, i = 0; s < pd[4]; ++s) {
    for (size_t t = 0; t < size_t(seqlens[s]); ++t) {
      const size_t meta = size_t(table[s * pd[5] + t / page]) * row;
      for (size_t c = 0; c < row; ++c, ++i) {
        bounded = bounded && kmin[meta + c] <= kn[i] && kn[i] <= kmax[meta + c];
      }
    }
  }
  std::printf("paged append + decode cpu: %zu tokens, rel L2 vs the Rust f64 reference %.3e, "
              "page bounds %s\n",
              kn.size() / row, aerr, bounded ? "hold" : "VIOLATED");
  ok = ok && aerr < 1e-5 && bounded;

  // Merge of two partial results over disjoint keys, out of place and in place.
  std::vector<uint64_t> md;
  if (!read_vec(f, md, 4)) {
    std::fprintf(stderr, "short fixture (merge)\n");
    return 2;
  }
  const longattn_merge_desc mdesc = {md[0], md[1], md[2], md[3]};
  size_t mo_len = 0, ml_len = 0;
  if (longattn_merge_sizes(&mdesc, &mo_len, &ml_len) != LONGATTN_OK) {
    std::fprintf(stderr, "merge sizes: %s\n", longattn_last_error());
    return 1;
  }
  std::vector<float> oa, la, ob, lb;
  std::vector<double> wo, wl;
  if (!read_vec(f, oa, mo_len) || !read_vec(f, la, ml_len) || !read_vec(f, ob, mo_len) ||
      !read_vec(f, lb, ml_len) || !read_vec(f, wo, mo_len) || !read_vec(f, wl, ml_len)) {
    std::fprintf(stderr, "short fixture (merge)\n");
    return 2;
  }
  std::vector<float> mo(mo_len, NAN), ml(ml_len, NAN);
  const longattn_partial a = {oa.data(), oa.size(), la.data(), la.size()};
  const longattn_partial b2 = {ob.data(), ob.size(), lb.data(), lb.size()};
  st = longattn_merge_cpu(&mdesc, LONGATTN_F32, a, b2, {mo.data(), mo.size(), ml.data(), ml.size()});
  if (st != LONGATTN_OK) {
    std::fprintf(stderr, "merge: status %d: %s\n", int(st), longattn_last_error());
    return 1;
  }
  const double merr = rel_l2(mo, wo), lerr = rel_l2(ml, wl);
  st = longattn_merge_into_cpu(&mdesc, LONGATTN_F32, {oa.data(), oa.size(), la.data(), la.size()},
                               b2);
  if (st != LONGATTN_OK) {
    std::fprintf(stderr, "merge into: status %d: %s\n", int(st), longattn_last_error());
    return 1;
  }
  const double ierr = rel_l2(oa, wo);
  std::printf("merge cpu: rel L2 vs the Rust f64 reference over all the keys: out %.3e, lse "
              "%.3e, in place %.3e\n",
              merr, lerr, ierr);
  ok = ok && merr < 1e-5 && lerr < 1e-5 && ierr < 1e-5;
  st = longattn_merge_cpu(&mdesc, LONGATTN_F32, {oa.data(), oa.size() - 1, la.data(), la.size()},
                          b2, {mo.data(), mo.size(), ml.data(), ml.size()});
  std::printf("merge with a short o: status %d (%s)\n", int(st), longattn_last_error());
  ok = ok && st == LONGATTN_ERR_SHAPE;
  ok = check_neighborhood_and_block_sparse() && ok;
  std::printf("%s\n", ok ? "OK" : "FAILED");
  return ok ? 0 : 1;
}
