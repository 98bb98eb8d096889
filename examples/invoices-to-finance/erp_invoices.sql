-- The ERP's sales invoices, derived from Northwind: one per shipped order, its lines from
-- order_details (plus a freight line), amounts exact (numeric, two decimals, rounded per line as
-- the ERP prints them). run.py runs this once after loading Northwind.
--
-- A table kept current by triggers, not a view: the PostgreSQL source needs a primary key and
-- change capture triggers, which a view cannot have. An order that ships gets its invoice; a
-- changed line or freight changes it; an invoice that would come out the same is not touched.

CREATE VIEW invoice_source AS
SELECT 'INV-' || o.order_id            AS invoice_number,
       o.order_id,
       o.customer_id,
       o.shipped_date                  AS issue_date,
       o.shipped_date + 30             AS due_date,          -- 30 days net
       'USD'::char(3)                  AS currency,
       'Order ' || o.order_id          AS reference,
       l.lines,
       l.subtotal,
       l.subtotal                      AS total              -- Northwind charges no tax
  FROM orders o
  CROSS JOIN LATERAL (
      WITH items AS (
          SELECT d.product_id, p.product_name, d.quantity,
                 round(d.unit_price::numeric, 2) AS unit_price,
                 round(d.discount::numeric, 2)   AS discount
            FROM order_details d JOIN products p USING (product_id)
           WHERE d.order_id = o.order_id
      ), priced AS (
          SELECT i.*, round(i.quantity * i.unit_price * (1 - i.discount), 2) AS line_amount FROM items i
      ), all_lines AS (
          SELECT 0 AS grp, product_id AS ord, line_amount,
                 jsonb_build_object('product_id', product_id, 'description', product_name,
                                    'quantity', quantity, 'unit_price', unit_price::text,
                                    'discount', discount::text, 'line_amount', line_amount::text) AS line
            FROM priced
          UNION ALL
          SELECT 1, 0, round(o.freight::numeric, 2),
                 jsonb_build_object('description', 'Freight', 'quantity', 1,
                                    'unit_price', round(o.freight::numeric, 2)::text, 'discount', '0',
                                    'line_amount', round(o.freight::numeric, 2)::text)
           WHERE o.freight > 0
      )
      SELECT jsonb_agg(line ORDER BY grp, ord) AS lines, sum(line_amount) AS subtotal FROM all_lines
  ) l
 WHERE o.shipped_date IS NOT NULL AND l.lines IS NOT NULL;

CREATE TABLE invoices (
    invoice_number text PRIMARY KEY,          -- INV-10248: the mesh key
    order_id       smallint NOT NULL UNIQUE,
    customer_id    varchar(5) NOT NULL,
    issue_date     date NOT NULL,
    due_date       date NOT NULL,
    currency       char(3) NOT NULL,
    reference      text,
    lines          jsonb NOT NULL,            -- amounts as decimal text, never floats
    subtotal       numeric(12, 2) NOT NULL,
    total          numeric(12, 2) NOT NULL
);

INSERT INTO invoices (invoice_number, order_id, customer_id, issue_date, due_date, currency, reference,
                      lines, subtotal, total)
SELECT invoice_number, order_id, customer_id, issue_date, due_date, currency, reference, lines, subtotal, total
  FROM invoice_source;

CREATE FUNCTION erp_invoice_refresh(p_order integer) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO invoices AS i (invoice_number, order_id, customer_id, issue_date, due_date, currency,
                               reference, lines, subtotal, total)
    SELECT invoice_number, order_id, customer_id, issue_date, due_date, currency, reference, lines,
           subtotal, total
      FROM invoice_source WHERE order_id = p_order
    ON CONFLICT (invoice_number) DO UPDATE
       SET customer_id = EXCLUDED.customer_id, issue_date = EXCLUDED.issue_date,
           due_date = EXCLUDED.due_date, reference = EXCLUDED.reference, lines = EXCLUDED.lines,
           subtotal = EXCLUDED.subtotal, total = EXCLUDED.total
     WHERE (i.customer_id, i.issue_date, i.due_date, i.reference, i.lines, i.subtotal, i.total)
           IS DISTINCT FROM (EXCLUDED.customer_id, EXCLUDED.issue_date, EXCLUDED.due_date,
                             EXCLUDED.reference, EXCLUDED.lines, EXCLUDED.subtotal, EXCLUDED.total);
    DELETE FROM invoices
     WHERE order_id = p_order AND NOT EXISTS (SELECT 1 FROM invoice_source WHERE order_id = p_order);
END $$;

CREATE FUNCTION erp_invoice_on_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        PERFORM erp_invoice_refresh(OLD.order_id);
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        PERFORM erp_invoice_refresh(NEW.order_id);
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER erp_invoice_orders AFTER INSERT OR UPDATE OR DELETE ON orders
    FOR EACH ROW EXECUTE FUNCTION erp_invoice_on_change();
CREATE TRIGGER erp_invoice_order_details AFTER INSERT OR UPDATE OR DELETE ON order_details
    FOR EACH ROW EXECUTE FUNCTION erp_invoice_on_change();
