//! A hostile guest's virtqueue: the fuzz input is the guest's memory (descriptor
//! table, available ring, buffers). Every chain the queue yields is gathered into a
//! request and answered as the vhost-user-fs device does; nothing may panic, read or
//! write outside guest memory, or build a request above the size limit.

#![no_main]

use fsva_vhost::chain::{read_request, write_reply, MAX_REQUEST};
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const QUEUE_SIZE: u16 = 16;
const MEMORY: usize = 0x10000;

fuzz_target!(|data: &[u8]| {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEMORY)]).unwrap();
    mem.write_slice(&data[..data.len().min(MEMORY)], GuestAddress(0))
        .unwrap();
    // Descriptor table at 0 (16 x 16 bytes), available ring at 0x100, used ring at 0x200.
    let mut q = Queue::new(QUEUE_SIZE).unwrap();
    q.set_size(QUEUE_SIZE);
    q.set_desc_table_address(Some(0), Some(0));
    q.set_avail_ring_address(Some(0x100), Some(0));
    q.set_used_ring_address(Some(0x200), Some(0));
    q.set_ready(true);
    let reply: Vec<u8> = (0..8192u32).map(|i| i as u8).collect();
    let mut frame = Vec::new();
    for _ in 0..QUEUE_SIZE {
        let Some(chain) = q.pop_descriptor_chain(&mem) else {
            break;
        };
        let head = chain.head_index();
        if let Ok(space) = read_request(&mem, chain, &mut frame) {
            assert!(frame.len() <= MAX_REQUEST);
            let n = frame.len().min(reply.len());
            let written = write_reply(&mem, &space, &reply[..n]);
            assert!(written.is_ok() == (n <= space.capacity()));
        }
        let _ = q.add_used(&mem, head, 0);
    }
});
