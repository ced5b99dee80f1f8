//! Paged sparse decode (in progress).
