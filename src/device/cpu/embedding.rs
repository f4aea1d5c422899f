//! Token embedding: a row gather forward, a row scatter-add backward.

use rayon::prelude::*;

use super::Real;

/// `out[N,C] = wte[ids[n], :]`   (`=`)
///
/// ids [N] (each < V), wte [V,C], out [N,C]. Parallel over the rows of `out`.
pub fn embedding_fwd<T: Real>(out: &mut [T], ids: &[u32], wte: &[T], c: usize) {
    if c == 0 {
        return;
    }
    out.par_chunks_mut(c)
        .zip(ids.par_iter())
        .for_each(|(row, &id)| {
            let start = id as usize * c;
            row.copy_from_slice(&wte[start..start + c]);
        });
}

/// `dwte[ids[n], :] += dout[n, :]` for every n   (`+=`)
///
/// ids [N] (each < V, repeats allowed), dout [N,C], dwte [V,C]. The rows of dout are grouped by
/// id first (a counting sort); each row of dwte then sums its rows of dout in increasing n and
/// adds the sum once, in parallel over the rows of dwte: no two threads touch one row, and the
/// result does not depend on the number of threads.
pub fn embedding_bwd<T: Real>(dwte: &mut [T], ids: &[u32], dout: &[T], c: usize) {
    if c == 0 {
        return;
    }
    let v = dwte.len() / c;
    // order[start[id]..start[id + 1]] are the n with ids[n] == id, increasing.
    let mut start = vec![0usize; v + 1];
    for &id in ids {
        start[id as usize + 1] += 1;
    }
    for i in 0..v {
        start[i + 1] += start[i];
    }
    let mut next = start.clone();
    let mut order = vec![0usize; ids.len()];
    for (n, &id) in ids.iter().enumerate() {
        order[next[id as usize]] = n;
        next[id as usize] += 1;
    }
    dwte.par_chunks_mut(c)
        .enumerate()
        .for_each_init(Vec::new, |acc, (id, row)| {
            let rows = &order[start[id]..start[id + 1]];
            if rows.is_empty() {
                return;
            }
            acc.clear();
            acc.resize(c, T::zero());
            for &n in rows {
                for (a, &g) in acc.iter_mut().zip(&dout[n * c..(n + 1) * c]) {
                    *a += g;
                }
            }
            for (d, &a) in row.iter_mut().zip(acc.iter()) {
                *d += a;
            }
        });
}
