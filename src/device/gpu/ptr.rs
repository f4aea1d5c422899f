//! Pointer arguments of the launchers: host slices (the emulator) or device addresses (the CUDA
//! device), behind one type each so that a launcher is written once for both backends.
//!
//! - [`In`]: a `const T*` kernel parameter; `&[T]` converts into it.
//! - [`Out`]: a `T*` kernel parameter; `&mut [T]` converts into it.
//! - [`Ids`]: a `const unsigned*` of token ids (or positions) that the kernel indexes with
//!   unchecked; the launcher checks them against their limit first: a host slice by scanning it,
//!   device memory by the bound its owner recorded on the host when it wrote the ids.
//!
//! A device variant is made only by the CUDA device, from memory it owns and borrows for `'a`
//! ([`DevPtr::new`]); the emulator refuses device addresses and the CUDA backend refuses host
//! pointers, so a launch can never hand one kind of memory to the other. A shared variant is
//! host memory that buffers share ([`crate::device::Device::alloc_shared`] on the emulator),
//! passed as a host pointer with no Rust reference made to it (another buffer may overlap it).

use std::marker::PhantomData;

use super::EmuArgs;
use crate::{Error, Result};

/// `len` elements of `T` at address `addr` (device memory, or shared host memory of the
/// emulator), borrowed for `'a`.
#[derive(Debug)]
pub struct DevPtr<'a, T> {
    addr: u64,
    len: usize,
    _borrow: PhantomData<&'a [T]>,
}

impl<T> Clone for DevPtr<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for DevPtr<'_, T> {}

impl<'a, T> DevPtr<'a, T> {
    /// `addr` must be the device address of `len` live elements of `T` that stay allocated (and,
    /// for an output, unaliased) for `'a`: the CUDA device makes these from its own buffers.
    pub fn new(addr: u64, len: usize) -> Self {
        DevPtr {
            addr,
            len,
            _borrow: PhantomData,
        }
    }
    pub fn addr(&self) -> u64 {
        self.addr
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// `len` elements of `T` at host address `addr` in memory that buffers of the emulated device
/// share ([`crate::device::emu::SharedMem`]), borrowed for `'a`. Made only by that device, from
/// a buffer it checked lies in its shared memory: a kernel given one reads and writes there.
#[derive(Debug)]
pub struct SharedPtr<'a, T>(DevPtr<'a, T>);

impl<T> Clone for SharedPtr<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SharedPtr<'_, T> {}

impl<T> SharedPtr<'_, T> {
    /// `addr` must be the address of `len` elements of T in a shared memory that stays
    /// allocated for `'a` (the buffer borrowed for `'a` holds it).
    pub(crate) fn new(addr: u64, len: usize) -> Self {
        SharedPtr(DevPtr::new(addr, len))
    }
    pub fn addr(&self) -> u64 {
        self.0.addr()
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A `const T*` kernel parameter.
#[derive(Debug)]
pub enum In<'a, T> {
    Host(&'a [T]),
    Device(DevPtr<'a, T>),
    /// host memory that other buffers may share (the emulator's shared allocations)
    Shared(SharedPtr<'a, T>),
}

impl<T> Clone for In<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for In<'_, T> {}

impl<'a, T> In<'a, T> {
    pub fn len(&self) -> usize {
        match self {
            In::Host(s) => s.len(),
            In::Device(p) => p.len(),
            In::Shared(p) => p.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The host slice, where the launcher must read values (None for device memory).
    pub fn host(&self) -> Option<&'a [T]> {
        match *self {
            In::Host(s) => Some(s),
            In::Device(_) | In::Shared(_) => None,
        }
    }
    /// The address of the first element (host or device): what a recorded call names.
    pub fn addr(&self) -> u64 {
        match self {
            In::Host(s) => s.as_ptr() as u64,
            In::Device(p) => p.addr(),
            In::Shared(p) => p.addr(),
        }
    }
}

impl<'a, T> From<&'a [T]> for In<'a, T> {
    fn from(s: &'a [T]) -> Self {
        In::Host(s)
    }
}
impl<'a, T> From<&'a mut [T]> for In<'a, T> {
    fn from(s: &'a mut [T]) -> Self {
        In::Host(s)
    }
}
impl<'a, T> From<&'a Vec<T>> for In<'a, T> {
    fn from(s: &'a Vec<T>) -> Self {
        In::Host(s)
    }
}
impl<'a, T> From<DevPtr<'a, T>> for In<'a, T> {
    fn from(p: DevPtr<'a, T>) -> Self {
        In::Device(p)
    }
}

/// A `T*` kernel parameter (the kernel may write it).
#[derive(Debug)]
pub enum Out<'a, T> {
    Host(&'a mut [T]),
    Device(DevPtr<'a, T>),
    /// host memory that other buffers may share (the emulator's shared allocations)
    Shared(SharedPtr<'a, T>),
}

impl<'a, T> Out<'a, T> {
    pub fn len(&self) -> usize {
        match self {
            Out::Host(s) => s.len(),
            Out::Device(p) => p.len(),
            Out::Shared(p) => p.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The address of the first element (host or device): what a recorded call names.
    pub fn addr(&self) -> u64 {
        match self {
            Out::Host(s) => s.as_ptr() as u64,
            Out::Device(p) => p.addr(),
            Out::Shared(p) => p.addr(),
        }
    }
}

impl<T> Out<'_, T> {
    /// A shorter borrow of the same memory, for one launch of several that write it.
    pub fn reborrow(&mut self) -> Out<'_, T> {
        match self {
            Out::Host(s) => Out::Host(s),
            Out::Device(p) => Out::Device(*p),
            Out::Shared(p) => Out::Shared(*p),
        }
    }

    /// The same memory as the input of a later launch (a scratch written, then read).
    pub fn as_in(&self) -> In<'_, T> {
        match self {
            Out::Host(s) => In::Host(s),
            Out::Device(p) => In::Device(*p),
            Out::Shared(p) => In::Shared(*p),
        }
    }
}

impl<'a, T> From<&'a mut [T]> for Out<'a, T> {
    fn from(s: &'a mut [T]) -> Self {
        Out::Host(s)
    }
}
impl<'a, T> From<&'a mut Vec<T>> for Out<'a, T> {
    fn from(s: &'a mut Vec<T>) -> Self {
        Out::Host(s)
    }
}
impl<'a, T> From<DevPtr<'a, T>> for Out<'a, T> {
    fn from(p: DevPtr<'a, T>) -> Self {
        Out::Device(p)
    }
}

/// Token ids (or positions) a kernel indexes with unchecked.
#[derive(Clone, Copy, Debug)]
pub enum Ids<'a> {
    Host(&'a [u32]),
    /// Device ids, every one below `bound` (recorded on the host by whoever wrote them).
    Device {
        ptr: DevPtr<'a, u32>,
        bound: usize,
    },
}

impl<'a> Ids<'a> {
    pub fn len(&self) -> usize {
        match self {
            Ids::Host(s) => s.len(),
            Ids::Device { ptr, .. } => ptr.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The host ids, where the launcher must read values (None for device memory).
    pub fn host(&self) -> Option<&'a [u32]> {
        match *self {
            Ids::Host(s) => Some(s),
            Ids::Device { .. } => None,
        }
    }

    /// Every id must be below `limit` (the kernels index with them unchecked).
    pub fn check(&self, op: &'static str, what: &str, limit: usize) -> Result<()> {
        match *self {
            Ids::Host(ids) => match ids.iter().enumerate().find(|(_, &id)| id as usize >= limit) {
                None => Ok(()),
                Some((i, id)) => Err(Error::invalid(
                    op,
                    format!("{what}[{i}] = {id} is out of range (must be < {limit})"),
                )),
            },
            Ids::Device { bound, .. } if bound <= limit || self.is_empty() => Ok(()),
            Ids::Device { bound, .. } => Err(Error::invalid(
                op,
                format!(
                    "{what}: ids up to {} are out of range (must be < {limit})",
                    bound - 1
                ),
            )),
        }
    }
}

impl<'a> From<&'a [u32]> for Ids<'a> {
    fn from(s: &'a [u32]) -> Self {
        Ids::Host(s)
    }
}
impl<'a> From<&'a Vec<u32>> for Ids<'a> {
    fn from(s: &'a Vec<u32>) -> Self {
        Ids::Host(s)
    }
}

impl<'a> EmuArgs<'a> {
    /// A `const T*` parameter, host or device.
    pub fn input<T: bytemuck::Pod>(&mut self, x: In<'a, T>) -> &mut Self {
        match x {
            In::Host(s) => self.ptr(s),
            In::Device(p) => self.device_range::<T>(p.addr(), p.len(), false),
            In::Shared(p) => self.shared_ptr::<T>(p.addr(), p.len(), false),
        }
    }

    /// A `T*` parameter, host or device.
    pub fn output<T: bytemuck::Pod>(&mut self, x: Out<'a, T>) -> &mut Self {
        match x {
            Out::Host(s) => self.ptr_mut(s),
            Out::Device(p) => self.device_range::<T>(p.addr(), p.len(), true),
            Out::Shared(p) => self.shared_ptr::<T>(p.addr(), p.len(), true),
        }
    }

    /// An optional `const T*` parameter: null when absent.
    pub fn input_opt<T: bytemuck::Pod>(&mut self, x: Option<In<'a, T>>) -> &mut Self {
        match x {
            Some(x) => self.input(x),
            None => self.null::<T>(),
        }
    }

    /// An optional `T*` parameter: null when absent.
    pub fn output_opt<T: bytemuck::Pod>(&mut self, x: Option<Out<'a, T>>) -> &mut Self {
        match x {
            Some(x) => self.output(x),
            None => self.null_mut::<T>(),
        }
    }

    /// A `const unsigned*` of ids.
    pub fn ids(&mut self, x: Ids<'a>) -> &mut Self {
        match x {
            Ids::Host(s) => self.ptr(s),
            Ids::Device { ptr, .. } => self.device_range::<u32>(ptr.addr(), ptr.len(), false),
        }
    }
}
